"""Checking definitions: every problem of every file at once, each as ``file:line: path: message``,
references in templates and arguments checked at load, several definitions paths, python_paths."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

from contracts.definitions import Catalog, DefinitionError, DefinitionsFile
from contracts.graphs import GraphDefinition
from contracts.workflows import WorkflowDefinition
from corral.demo import DEFINITIONS as DEMO
from services.runtime.catalog import check_definitions, load_catalog, split_paths
from services.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CORRAL = [sys.executable, "-m", "corral.cli"]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def report(*paths: Path, imports: bool = False) -> list[str]:
    return [str(problem) for problem in check_definitions(list(paths), imports=imports).problems]


TOOL = """
tools:
  - name: lookup
    python: {callable: "corral.demo.tools:lookup_orders"}
"""


# ---- the shape of a file -----------------------------------------------------------------


def test_an_unknown_key_names_the_allowed_keys_and_the_closest(tmp_path):
    path = write(
        tmp_path,
        "a.yaml",
        """
        graphs:
          - name: g
            entry: a
            nodes:
              a: {kind: tool, tool: lookup, argz: {q: $input.text}}
        """,
    )
    assert report(path) == [
        f"{path}:5: graphs[0].nodes.a.argz: unknown key 'argz' (did you mean 'args'?); "
        "allowed here: args, kind, max_visits, output, timeout_s, tool"
    ]


def test_an_unknown_top_level_key_is_matched_to_a_list(tmp_path):
    path = write(tmp_path, "a.yaml", "tool:\n  - name: x\n")
    (line,) = report(path)
    assert line.startswith(f"{path}:1: tool: unknown key 'tool' (did you mean 'tools'?); allowed here: ")
    assert "graphs" in line and "tenants" in line


def test_a_tenant_written_with_name_is_told_it_means_tenant(tmp_path):
    path = write(tmp_path, "a.yaml", "tenants:\n  - name: acme\n    tools: []\n")
    assert report(path) == [
        f"{path}:2: tenants[0]: missing required key 'tenant'",
        f"{path}:2: tenants[0].name: unknown key 'name' (did you mean 'tenant'?); allowed here: connection, "
        "default_route, max_input_bytes, max_open_runs, principal_scoped, rate_limit, routes, tenant, tools",
    ]


def test_a_node_without_a_kind_or_with_a_wrong_one_lists_the_kinds(tmp_path):
    path = write(
        tmp_path,
        "a.yaml",
        """
        graphs:
          - name: g
            entry: a
            nodes:
              a: {tool: lookup}
              b:
                kind: tol
                tool: lookup
        """,
    )
    kinds = "tool, model, agent, function, subgraph, respond, join"
    assert report(path) == [
        f"{path}:5: graphs[0].nodes.a: missing 'kind': one of {kinds}",
        f"{path}:7: graphs[0].nodes.b.kind: unknown kind 'tol' (did you mean 'tool'?); one of {kinds}",
    ]


def test_a_missing_key_and_a_wrong_value_point_at_their_lines(tmp_path):
    path = write(
        tmp_path,
        "a.yaml",
        """
        graphs:
          - name: g
            entry: a
            nodes:
              a: {kind: respond}
            edges:
              - {from: a, to: 3}
        tenants:
          - tenant: acme
            routes:
              r: {graph: g, pattern: grph}
        """,
    )
    assert report(path) == [
        f"{path}:5: graphs[0].nodes.a: missing required key 'template'",
        f"{path}:7: graphs[0].edges[0].to: Input should be a valid string or a valid list",
        f"{path}:11: tenants[0].routes.r.pattern: Input should be 'graph', 'workflow', 'swarm' or "
        "'orchestrator', not 'grph' (did you mean 'graph'?)",
    ]


def test_a_yaml_syntax_error_names_its_line(tmp_path):
    path = write(tmp_path, "a.yaml", "tools:\n  - name: x\n  python: [\n")
    (line,) = report(path)
    assert line.startswith(f"{path}:3: not YAML: ")


def test_every_file_is_reported_and_the_good_parts_are_still_cross_checked(tmp_path):
    """A broken tenant in one file does not hide an unknown tool in another; a graph whose own
    definition is broken is not reported again as unknown where a route names it."""
    first = write(
        tmp_path,
        "a.yaml",
        """
        graphs:
          - name: broken
            entry: a
            nodes: {a: {kind: respond, template: x, colour: red}}
        tenants:
          - tenant: acme
            routes: {r: {graph: broken}}
        """,
    )
    second = write(
        tmp_path,
        "b.yaml",
        """
        graphs:
          - name: g
            entry: a
            nodes:
              a: {kind: tool, tool: lokup}
        """,
    )
    lines = report(tmp_path)
    assert lines == [
        f"{first}:4: graphs[0].nodes.a.colour: unknown key 'colour'; allowed here: kind, max_visits, output, "
        "template, timeout_s",
        f"{second}:5: graphs[0].nodes.a.tool: graph 'g' uses unknown tool 'lokup'",
    ]


def test_cross_references_point_at_the_key_that_names_the_missing_definition(tmp_path):
    path = write(
        tmp_path,
        "a.yaml",
        TOOL
        + """
graphs:
  - name: g
    entry: a
    nodes:
      a: {kind: tool, tool: lookupp}
tenants:
  - tenant: acme
    default_route: r
    routes:
      r: {graph: gg}
    tools: [lookup, lokup]
""",
    )
    assert report(path) == [
        f"{path}:9: graphs[0].nodes.a.tool: graph 'g' uses unknown tool 'lookupp' (did you mean 'lookup'?)",
        f"{path}:14: tenants[0].routes.r.graph: tenant 'acme': route 'r' uses unknown graph 'gg' (did you mean 'g'?)",
        f"{path}:15: tenants[0].tools[1]: tenant 'acme' allows unknown tool 'lokup' (did you mean 'lookup'?)",
    ]


def test_a_local_step_may_call_a_python_or_http_tool_but_not_an_mcp_one(tmp_path):
    path = write(
        tmp_path,
        "a.yaml",
        TOOL
        + """
  - {name: read, mcp: {server: files, tool: read}}
mcp_servers:
  - {name: files, http: {url: "http://127.0.0.1:9/mcp"}}
workflows:
  - name: w
    steps:
      - {name: here, kind: tool, tool: lookup, local: true}
      - {name: there, kind: tool, tool: read, local: true}
""",
    )
    assert report(path) == [
        f"{path}:12: workflows[0].steps[1].local: workflow 'w': step 'there' calls MCP tool 'read' locally; "
        "only Python and HTTP tools run in the workflow replica (remove `local`)"
    ]


def test_a_name_defined_in_two_files_is_reported_where_it_is_defined_again(tmp_path):
    write(tmp_path, "a.yaml", TOOL)
    second = write(tmp_path, "b.yaml", TOOL)
    assert report(tmp_path) == [f"{second}:2: tools[0].name: tool 'lookup' is defined twice"]


def test_a_json_file_is_placed_on_its_lines_too(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{\n  "tools": [\n    {"name": "x", "pyhton": {}}\n  ]\n}\n')
    (line,) = report(path)
    assert line.startswith(f"{path}:3: tools[0].pyhton: unknown key 'pyhton' (did you mean 'python'?)")


def test_a_service_started_on_broken_definitions_exits_with_the_report_not_a_traceback(tmp_path, monkeypatch):
    from services.router.__main__ import build
    from services.router.manifest import MANIFEST
    from services.runtime.service import run_service

    path = write(tmp_path, "a.yaml", "tenants:\n  - tenant: acme\n    tools: [nope]\n")
    monkeypatch.setenv("CORRAL_DEFINITIONS", str(path))
    with pytest.raises(SystemExit) as exited:
        run_service(build, MANIFEST)
    assert str(exited.value) == (
        f"router: the definitions have problems:\n"
        f"{path}:3: tenants[0].tools[0]: tenant 'acme' allows unknown tool 'nope'"
    )


def test_load_catalog_raises_with_every_line_of_the_report(tmp_path):
    write(tmp_path, "a.yaml", "tool: []\ntenants: [{name: x}]\n")
    with pytest.raises(DefinitionError) as raised:
        load_catalog(tmp_path)
    assert raised.value.message.count("\n") == 2 and "a.yaml:1: tool: unknown key" in raised.value.message


def test_the_demo_definitions_have_no_problem_and_import():
    assert report(DEMO, imports=True) == []


# ---- what templates, arguments and conditions read ---------------------------------------


def graph_problems(**graph) -> list[str]:
    spec = {"name": "g", **graph}
    with pytest.raises(ValueError) as raised:
        GraphDefinition.model_validate(spec)
    return [problem.message for problem in raised.value.errors()[0]["ctx"]["error"].problems]


LOOKUP = {"kind": "tool", "tool": "lookup", "args": {"q": "$input.text"}}
SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}}


def test_a_typo_in_a_template_is_caught_with_the_closest_name():
    problems = graph_problems(
        entry="lookup",
        nodes={"lookup": LOOKUP, "answer": {"kind": "respond", "template": "It is {lokup.status}."}},
        edges=[{"from": "lookup", "to": "answer"}],
    )
    assert problems == [
        "{lokup.status} reads 'lokup', which is neither the input nor the output of a node (did you mean 'lookup'?)"
    ]


def test_an_input_field_the_input_schema_does_not_declare_is_caught_in_templates_and_args():
    problems = graph_problems(
        input_schema=SCHEMA,
        entry="lookup",
        nodes={
            "lookup": {"kind": "tool", "tool": "lookup", "args": {"q": "$input.txt"}},
            "answer": {"kind": "respond", "template": "You asked {input.txt}"},
        },
        edges=[{"from": "lookup", "to": "answer"}],
    )
    declared = "which the input_schema does not declare (did you mean 'text'?)"
    assert problems == [
        f"$input.txt reads input field 'txt', {declared}",
        f"{{input.txt}} reads input field 'txt', {declared}",
    ]


def test_a_node_may_not_read_a_node_that_runs_after_it_or_only_on_another_branch():
    problems = graph_problems(
        entry="lookup",
        nodes={
            "lookup": {"kind": "tool", "tool": "lookup", "args": {"q": "$reply"}},
            "found": {"kind": "respond", "template": "found"},
            "missing": {"kind": "respond", "template": "missing"},
            "reply": {"kind": "respond", "template": "{found}"},
        },
        edges=[
            {"from": "lookup", "to": "found", "when": "lookup.found == true"},
            {"from": "lookup", "to": "missing"},
            {"from": "found", "to": "reply"},
            {"from": "missing", "to": "reply"},
        ],
    )
    assert problems == [
        "$reply reads 'reply', which not every path to node 'lookup' has written (it is the output of node 'reply')",
        "{found} reads 'found', which not every path to node 'reply' has written (it is the output of node 'found')",
    ]


def test_branches_that_write_the_same_key_and_a_join_of_all_may_be_read_after():
    GraphDefinition.model_validate(
        {
            "name": "g",
            "entry": "lookup",
            "nodes": {
                "lookup": LOOKUP,
                "found": {"kind": "respond", "template": "found", "output": "text"},
                "missing": {"kind": "respond", "template": "missing", "output": "text"},
                "orders": {"kind": "tool", "tool": "lookup"},
                "incidents": {"kind": "tool", "tool": "lookup"},
                "both": {"kind": "join"},
                "reply": {"kind": "respond", "template": "{text}: {orders.x} {incidents.y} {both.orders}"},
            },
            "edges": [
                {"from": "lookup", "to": "found", "when": "lookup.found == true"},
                {"from": "lookup", "to": "missing"},
                {"from": "found", "to": ["orders", "incidents"]},
                {"from": "missing", "to": ["orders", "incidents"]},
                {"from": "orders", "to": "both"},
                {"from": "incidents", "to": "both"},
                {"from": "both", "to": "reply"},
            ],
        }
    )


def test_a_condition_reads_the_node_it_leaves_and_a_typo_in_it_is_caught():
    problems = graph_problems(
        entry="lookup",
        nodes={"lookup": LOOKUP, "answer": {"kind": "respond", "template": "x"}},
        edges=[{"from": "lookup", "to": "answer", "when": "lookup.found == true and lokup.n > 1"}],
    )
    assert problems == [
        "lokup.n reads 'lokup', which is neither the input nor the output of a node (did you mean 'lookup'?)"
    ]


def test_a_key_a_known_output_does_not_have_is_caught():
    problems = graph_problems(
        model="m",
        entry="classify",
        nodes={
            "classify": {
                "kind": "model",
                "prompt": "Classify: {input.text}",
                "output_schema": {"type": "object", "properties": {"category": {"type": "string"}}},
            },
            "say": {"kind": "respond", "template": "{classify.categroy}"},
            "again": {"kind": "respond", "template": "{say.text}"},
        },
        edges=[{"from": "classify", "to": "say"}, {"from": "say", "to": "again"}],
    )
    assert problems == [
        "{classify.categroy} reads 'categroy', which the output of node 'classify' does not have (it has category)"
        " (did you mean 'category'?)",
        "{say.text}: the output of node 'say' is text, with no 'text'",
    ]


def test_the_ways_other_template_languages_write_placeholders_are_pointed_out():
    problems = graph_problems(
        entry="lookup",
        nodes={
            "lookup": {"kind": "tool", "tool": "lookup", "args": {"q": "{input.text}"}},
            "answer": {"kind": "respond", "template": "{{lookup.status}} { lookup.id } $lookup.eta"},
        },
        edges=[{"from": "lookup", "to": "answer"}],
    )
    assert problems == [
        "'{input.text}' is passed as text: an argument reads $input.text",
        "'{{lookup.status}}': placeholders take single braces: {lookup.status}",
        "'{ lookup.id }': no spaces inside a placeholder: {lookup.id}",
        "'$lookup.eta' in a template is text: write {lookup.eta}",
    ]


def test_a_graph_has_no_params():
    problems = graph_problems(entry="say", nodes={"say": {"kind": "respond", "template": "{params.limit}"}})
    assert problems == ["{params.limit}: a graph has no params (a route's reach workflows)"]


def test_a_template_problem_is_reported_on_the_line_of_its_key(tmp_path):
    path = write(
        tmp_path,
        "a.yaml",
        TOOL
        + """
graphs:
  - name: g
    input_schema: {type: object, properties: {text: {type: string}}}
    entry: lookup
    nodes:
      lookup: {kind: tool, tool: lookup, args: {query: $input.text}}
      answer:
        kind: respond
        template: "Order {lokup.order.id}"
    edges:
      - {from: lookup, to: answer}
""",
    )
    assert report(path) == [
        f"{path}:13: graphs[0].nodes.answer.template: {{lokup.order.id}} reads 'lokup', which is neither the input "
        "nor the output of a node (did you mean 'lookup'?)"
    ]


def test_a_workflow_step_reading_a_step_not_declared_before_it_gets_the_closest_name():
    with pytest.raises(ValueError) as raised:
        WorkflowDefinition.model_validate(
            {
                "name": "w",
                "input_schema": {"type": "object", "properties": {"order_id": {"type": "string"}}},
                "steps": [
                    {"name": "lookup", "kind": "tool", "tool": "t", "args": {"id": "$input.order"}},
                    {"name": "refund", "kind": "tool", "tool": "t", "args": {"amount": "$lokup.amount"}},
                ],
            }
        )
    problems = raised.value.errors()[0]["ctx"]["error"].problems
    assert [(p.where, p.message) for p in problems] == [
        (
            ("steps", 0, "args", "id"),
            "$input.order reads input field 'order', which the input_schema does not declare"
            " (did you mean 'order_id'?)",
        ),
        (
            ("steps", 1, "args", "amount"),
            "step 'refund' reads 'lokup', which is neither input, params nor a step declared before it"
            " (did you mean 'lookup'?)",
        ),
    ]


# ---- where the definitions are -----------------------------------------------------------


def test_corral_definitions_takes_several_paths_separated_like_path():
    assert split_paths(f"/a{os.pathsep}/b/c.yaml{os.pathsep}") == [Path("/a"), Path("/b/c.yaml")]
    settings = Settings(definitions=f"{DEMO}{os.pathsep}/mine")
    assert settings.definitions_paths() == [DEMO, Path("/mine")]
    assert Settings(definitions=DEMO).definitions_paths() == [DEMO]


def test_the_demo_and_your_own_definitions_are_merged(tmp_path):
    write(
        tmp_path,
        "mine.yaml",
        """
        graphs:
          - name: mine
            entry: lookup
            nodes: {lookup: {kind: tool, tool: orders_lookup, args: {query: $input.text}}}
        tenants:
          - tenant: initech
            routes: {mine: {graph: mine}}
            tools: [orders_lookup]
        """,
    )
    catalog = load_catalog([DEMO, tmp_path])
    assert {"acme", "initech"} <= set(catalog.tenants) and "order_status" in catalog.graphs


def test_a_definitions_path_that_does_not_exist_is_a_problem(tmp_path):
    assert report(tmp_path / "nope") == [f"{tmp_path / 'nope'}: no such file or folder"]


def test_a_schema_file_next_to_the_definitions_is_not_read_as_definitions(tmp_path):
    write(tmp_path, "a.yaml", TOOL)
    (tmp_path / "definitions.schema.json").write_text('{"$defs": {}}')
    assert report(tmp_path) == []


def test_python_paths_make_a_tool_module_next_to_the_definitions_importable(tmp_path):
    module = f"shop_tools_{uuid.uuid4().hex[:8]}"
    (tmp_path / "code").mkdir()
    write(tmp_path / "code", f"{module}.py", "def find(ctx, order_id):\n    return {'id': order_id}\n")
    write(
        tmp_path,
        "shop.yaml",
        f"""
        python_paths: [code]
        tools:
          - name: find
            python: {{callable: "{module}:find"}}
        """,
    )
    assert report(tmp_path, imports=True) == []
    load_catalog(tmp_path)
    assert importlib.import_module(module).find(None, "o-1") == {"id": "o-1"}


def test_a_callable_that_does_not_import_is_reported_on_its_line(tmp_path):
    path = write(
        tmp_path, "a.yaml", 'python_paths: [missing]\ntools:\n  - name: x\n    python: {callable: "nowhere_x:f"}\n'
    )
    assert report(path, imports=True) == [
        f"{path}:1: python_paths[0]: no such folder: {tmp_path / 'missing'}",
        f"{path}:4: tools[0].python.callable: cannot import 'nowhere_x:f': ModuleNotFoundError: No module named "
        "'nowhere_x' (is its folder in python_paths?)",
    ]


def test_catalog_merge_reports_every_problem_at_once():
    spec = {"graphs": [{"name": "g", "entry": "a", "nodes": {"a": {"kind": "tool", "tool": "x"}}}]}
    spec["tenants"] = [{"tenant": "acme", "routes": {"r": {"graph": "h"}}, "tools": ["y"]}]
    with pytest.raises(DefinitionError) as raised:
        Catalog.merge([DefinitionsFile.model_validate(spec)])
    assert [(p.where, p.unknown) for p in raised.value.problems] == [
        (("graphs", 0, "nodes", "a", "tool"), "x"),
        (("tenants", 0, "tools", 0), "y"),
        (("tenants", 0, "routes", "r", "graph"), "h"),
    ]


# ---- the documented examples -------------------------------------------------------------


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_the_readme_example_is_accepted_by_corral_validate(tmp_path):
    section = (ROOT / "README.md").read_text().split("## Definitions", 1)[1].split("\n## ", 1)[0]
    (definitions,) = blocks(section, "yaml")
    (tools,) = blocks(section, "python")
    module = re.search(r'callable: "(\w+):', definitions).group(1)
    (tmp_path / "shop.yaml").write_text(definitions)
    (tmp_path / f"{module}.py").write_text(tools)
    checked = check_definitions([tmp_path], imports=True)
    assert checked.problems == []
    graph = checked.catalog.graphs["order_answer"]
    assert len(graph.nodes) == 3 and checked.catalog.tenants["shop"].routes


def test_every_example_of_the_reference_is_a_valid_definitions_file():
    text = (ROOT / "docs" / "definitions.md").read_text().split("<!-- generated", 1)[0]
    examples = blocks(text, "yaml")
    assert len(examples) >= 6
    for example in examples:
        DefinitionsFile.model_validate(yaml.safe_load(example) or {})


# ---- the commands ------------------------------------------------------------------------


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CORRAL, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def test_corral_validate_prints_nothing_for_the_demo_definitions():
    done = run("validate", str(DEMO))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_corral_validate_prints_each_problem_on_its_line_and_exits_1_without_a_traceback(tmp_path):
    path = write(tmp_path, "broken.yaml", "tools:\n  - name: x\n    pyhton: {callable: 'a:b'}\n")
    done = run("validate", str(path))
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"{path}:3: tools[0].pyhton: unknown key 'pyhton' (did you mean 'python'?); allowed here: description, "
        "http, mcp, name, parameters, python",
    ]
    assert "Traceback" not in done.stderr and done.stderr.strip() == "1 problem in the definitions"


def test_corral_up_checks_the_definitions_first_and_starts_nothing(tmp_path):
    path = write(tmp_path, "broken.yaml", "tenants:\n  - name: acme\n")
    state = tmp_path / "state"
    done = run("up", "--state-dir", str(state), "--port", "0", "--no-demo", env={"CORRAL_DEFINITIONS": str(path)})
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[0] == "error: the definitions have 2 problems; nothing was started:"
    assert lines[1] == f"{path}:2: tenants[0]: missing required key 'tenant'"
    assert lines[2].startswith(f"{path}:2: tenants[0].name: unknown key 'name' (did you mean 'tenant'?)")
    assert "Traceback" not in done.stderr and len(lines) == 3
    assert not (state / "nats.log").exists() and not (state / "corral.json").exists()
