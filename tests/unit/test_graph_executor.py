"""The graph executor: explicit path, conditional edges, limits that fire, determinism."""

import asyncio

import pytest

from contracts.definitions import GraphDefinition
from services.graph.errors import RunTimedOut, StepLimitExceeded
from services.graph.executor import CompiledGraph

ORDER_GRAPH = GraphDefinition.model_validate(
    {
        "name": "order_status",
        "entry": "lookup",
        "nodes": {
            "lookup": {"kind": "tool", "tool": "orders_lookup", "args": {"query": "$input.text"}},
            "answer": {"kind": "respond", "template": "Order {lookup.order.id} is {lookup.order.status}."},
            "not_found": {"kind": "respond", "template": "No order."},
        },
        "edges": [
            {"from": "lookup", "to": "answer", "when": "lookup.found == true"},
            {"from": "lookup", "to": "not_found"},
        ],
    }
)


def tools(result, calls=None, delay=0.0):
    async def call_tool(tool, arguments, timeout):
        if calls is not None:
            calls.append((tool, arguments))
        if delay:
            await asyncio.sleep(delay)  # a slow tool, not synchronisation
        return result

    return call_tool


async def no_events(node, elapsed_ms):
    return None


async def test_the_condition_picks_the_answer_branch_and_args_come_from_the_state():
    calls = []
    found = {"found": True, "order": {"id": "A-1", "status": "shipped"}}
    outcome = await CompiledGraph(ORDER_GRAPH).run(
        {"text": "where?"}, call_tool=tools(found, calls), node_done=no_events, timeout=5
    )
    assert outcome.output == "Order A-1 is shipped."
    assert outcome.path == ("lookup", "answer")
    assert calls == [("orders_lookup", {"query": "where?"})]


async def test_the_default_edge_is_taken_when_no_condition_holds():
    outcome = await CompiledGraph(ORDER_GRAPH).run(
        {"text": "x"}, call_tool=tools({"found": False}), node_done=no_events, timeout=5
    )
    assert outcome.path == ("lookup", "not_found")


async def test_conditional_edges_win_over_a_default_declared_first():
    definition = ORDER_GRAPH.model_copy(update={"edges": list(reversed(ORDER_GRAPH.edges))})
    outcome = await CompiledGraph(definition).run(
        {}, call_tool=tools({"found": True, "order": {}}), node_done=no_events, timeout=5
    )
    assert outcome.path == ("lookup", "answer")


async def test_every_node_reports_its_completion_in_order():
    seen = []

    async def node_done(node, elapsed_ms):
        seen.append(node)
        assert elapsed_ms >= 0

    await CompiledGraph(ORDER_GRAPH).run({}, call_tool=tools({"found": False}), node_done=node_done, timeout=5)
    assert seen == ["lookup", "not_found"]


async def test_the_same_input_gives_the_same_path_and_output_every_time():
    graph = CompiledGraph(ORDER_GRAPH)
    found = {"found": True, "order": {"id": "A-1", "status": "shipped"}}
    outcomes = {
        (o.path, o.output)
        for o in [
            await graph.run({"text": "q"}, call_tool=tools(found), node_done=no_events, timeout=5) for _ in range(20)
        ]
    }
    assert len(outcomes) == 1


async def test_a_cycle_stops_at_the_step_limit():
    looping = GraphDefinition.model_validate(
        {
            "name": "loop",
            "entry": "a",
            "max_steps": 5,
            "nodes": {"a": {"kind": "respond", "template": "again"}},
            "edges": [{"from": "a", "to": "a"}],
        }
    )
    with pytest.raises(StepLimitExceeded, match="5 steps"):
        await CompiledGraph(looping).run({}, call_tool=tools(None), node_done=no_events, timeout=5)


async def test_the_run_timeout_fires_on_a_slow_tool():
    with pytest.raises(RunTimedOut):
        await CompiledGraph(ORDER_GRAPH).run({}, call_tool=tools({}, delay=5), node_done=no_events, timeout=0.05)
