"""Definitions are validated at load time with precise errors."""

from pathlib import Path

import pytest
import yaml

from contracts.definitions import Catalog, DefinitionError, DefinitionsFile, Pattern, TenantPolicy
from contracts.expressions import ExpressionError, compile_expression, evaluate, render, resolve
from contracts.graphs import GraphDefinition
from corral.demo import DEFINITIONS as DEFAULT_DEFINITIONS
from services.runtime.catalog import load_catalog

TOOL = {"name": "lookup", "python": {"callable": "pkg.mod:fn"}}


def graph(**changes):
    spec = {
        "name": "g",
        "entry": "a",
        "nodes": {"a": {"kind": "tool", "tool": "lookup"}, "b": {"kind": "respond", "template": "x"}},
        "edges": [{"from": "a", "to": "b"}],
    }
    spec.update(changes)
    return spec


def test_the_shipped_demo_definitions_load():
    catalog = load_catalog(DEFAULT_DEFINITIONS)
    assert catalog.tenants["acme"].default_route == "order_status"
    assert catalog.graphs["order_status"].tools() == {"orders_lookup"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"entry": "nope"}, "entry 'nope' is not a node"),
        ({"edges": [{"from": "a", "to": "nowhere"}]}, "edge to unknown node 'nowhere'"),
        ({"edges": [{"from": "x", "to": "b"}]}, "edge from unknown node 'x'"),
        ({"edges": []}, "unreachable nodes ['b']"),
        ({"edges": [{"from": "a", "to": "b", "when": "__import__('os')"}]}, "not allowed"),
    ],
)
def test_bad_graphs_are_refused_with_a_precise_message(changes, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        GraphDefinition.model_validate(graph(**changes))


def test_a_graph_using_an_unknown_tool_is_refused():
    with pytest.raises(DefinitionError, match="unknown tool 'lookup'"):
        Catalog.merge([DefinitionsFile.model_validate({"graphs": [graph()]})])


def test_a_route_needing_a_tool_the_tenant_lacks_is_refused():
    spec = {
        "tools": [TOOL],
        "graphs": [graph()],
        "tenants": [{"tenant": "acme", "routes": {"r": {"graph": "g"}}, "tools": []}],
    }
    with pytest.raises(DefinitionError, match="not allowed"):
        Catalog.merge([DefinitionsFile.model_validate(spec)])


def test_names_defined_twice_are_refused():
    with pytest.raises(DefinitionError, match="defined twice"):
        Catalog.merge([DefinitionsFile.model_validate({"tools": [TOOL, TOOL]})])


def test_a_tenant_policy_with_an_invalid_tenant_id_is_refused():
    with pytest.raises(ValueError, match="invalid tenant id"):
        DefinitionsFile.model_validate({"tenants": [{"tenant": "*"}]})


def test_load_errors_name_the_file(tmp_path: Path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"graphs": [graph(entry="nope")]}))
    with pytest.raises(DefinitionError, match=r"bad\.yaml"):
        load_catalog(tmp_path)


STATE = {"lookup": {"found": True, "orders": [{"id": "A-1"}]}, "input": {"priority": "high", "count": 3}}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("lookup.found == true", True),
        ("lookup.found and input.count > 2", True),
        ("input.priority in ['high', 'urgent']", True),
        ("not lookup.found or input.count >= 10", False),
        ("lookup.orders[0].id == 'A-1'", True),
        ("lookup.missing.deeper == null", True),
        ("input.priority > 3", False),  # unlike types compare as false, not as an error
    ],
)
def test_conditions_evaluate_over_the_state(expression, expected):
    assert evaluate(compile_expression(expression), STATE) is expected


@pytest.mark.parametrize(
    "expression",
    ["open('x')", "x.__class__", "(lambda: 1)()", "[x for x in y]", "a if b else c", "x + 1", "'a' * 10**9", "a[b]"],
)
def test_anything_but_the_safe_form_is_refused(expression):
    with pytest.raises(ExpressionError):
        compile_expression(expression)


def test_templates_and_argument_references_read_the_state():
    assert render("order {lookup.orders.0.id}, missing '{nope}'", STATE) == "order A-1, missing ''"
    assert resolve({"q": "$input.priority", "n": [1, "$input.count"], "lit": "x"}, STATE) == {
        "q": "high",
        "n": [1, 3],
        "lit": "x",
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {
                "nodes": {"a": {"kind": "respond", "template": "x"}, "j": {"kind": "join"}},
                "edges": [{"from": "a", "to": "j"}],
            },
            "join 'j' has fewer than two branches",
        ),
        (
            {
                "nodes": {"a": {"kind": "respond", "template": "x"}, "b": {"kind": "respond", "template": "y"}},
                "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "a"}],
            },
            "cycle through ['a', 'b'] has no node with max_visits",
        ),
        (
            {"nodes": {"a": {"kind": "respond", "template": "x"}}, "edges": [{"from": "a", "to": "a"}]},
            "cycle through ['a'] has no node with max_visits",
        ),
        (
            {
                "nodes": {"a": {"kind": "respond", "template": "x"}, "b": {"kind": "respond", "template": "y"}},
                "edges": [{"from": "a", "to": "b"}, {"from": "a", "to": "end"}],
            },
            "node 'a' has 2 default edges",
        ),
        (
            {"nodes": {"a": {"kind": "model", "prompt": "p"}}},
            "model node 'a' names no model",
        ),
        (
            {
                "nodes": {"a": {"kind": "respond", "template": "x"}, "input": {"kind": "respond", "template": "y"}},
                "edges": [{"from": "a", "to": "input"}],
            },
            "reserved",
        ),
    ],
)
def test_graph_shapes_that_cannot_run_are_refused(spec, message):
    with pytest.raises(ValueError) as caught:
        GraphDefinition.model_validate({"name": "g", "entry": "a", **spec})
    assert message in str(caught.value)


def test_a_cycle_with_a_visit_limit_is_accepted():
    GraphDefinition.model_validate(
        {
            "name": "g",
            "entry": "a",
            "nodes": {
                "a": {"kind": "respond", "template": "x", "max_visits": 3},
                "b": {"kind": "respond", "template": "y"},
            },
            "edges": [{"from": "a", "to": "b"}, {"from": "b", "to": "a", "when": "true"}],
        }
    )


def test_every_tenant_sharing_a_route_target_is_checked_against_its_own_tools():
    # The tools a target needs are remembered across tenants (RouteNeeds), not their verdicts.
    inner = {"name": "inner", "entry": "x", "nodes": {"x": {"kind": "tool", "tool": "lookup"}}}
    tenants = [
        {"tenant": "ok", "routes": {"r": {"graph": "inner"}}, "tools": ["lookup"]},
        {"tenant": "lacks", "routes": {"r": {"graph": "inner"}}, "tools": []},
        {"tenant": "also-ok", "routes": {"r": {"graph": "inner"}}, "tools": ["lookup"]},
    ]
    with pytest.raises(DefinitionError) as refused:
        Catalog.merge([DefinitionsFile.model_validate({"tools": [TOOL], "graphs": [inner], "tenants": tenants})])
    assert [problem.message for problem in refused.value.problems] == [
        "tenant 'lacks': route 'r' needs tools ['lookup'] the tenant is not allowed"
    ]
    catalog = Catalog.merge([DefinitionsFile.model_validate({"tools": [TOOL], "graphs": [inner]})])
    needs: dict = {}
    for policy in (tenants[0], tenants[1]):
        found = catalog.tenant_problems(TenantPolicy.model_validate(policy), needs)
        assert bool(found) is (policy["tenant"] == "lacks")
    assert needs == {(Pattern.GRAPH, "inner"): frozenset({"lookup"})}


def test_subgraph_cycles_and_unknown_models_are_refused():
    inner = {"name": "inner", "entry": "x", "nodes": {"x": {"kind": "subgraph", "graph": "outer"}}}
    outer = {"name": "outer", "entry": "x", "nodes": {"x": {"kind": "subgraph", "graph": "inner"}}}
    with pytest.raises(DefinitionError, match="cycle"):
        Catalog.merge([DefinitionsFile.model_validate({"graphs": [inner, outer]})])
    uses_model = {"name": "m", "entry": "x", "model": "gpt", "nodes": {"x": {"kind": "model", "prompt": "p"}}}
    with pytest.raises(DefinitionError, match="unknown model 'gpt'"):
        Catalog.merge([DefinitionsFile.model_validate({"graphs": [uses_model]})])


def test_a_tenant_route_through_a_subgraph_needs_the_subgraphs_tools():
    inner = {"name": "inner", "entry": "x", "nodes": {"x": {"kind": "tool", "tool": "lookup"}}}
    outer = {"name": "outer", "entry": "x", "nodes": {"x": {"kind": "subgraph", "graph": "inner"}}}
    tenant = {"tenant": "acme", "routes": {"r": {"graph": "outer"}}, "tools": []}
    with pytest.raises(DefinitionError, match=r"needs tools \['lookup'\]"):
        Catalog.merge(
            [DefinitionsFile.model_validate({"tools": [TOOL], "graphs": [inner, outer], "tenants": [tenant]})]
        )
