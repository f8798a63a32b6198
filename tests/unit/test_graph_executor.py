"""The graph executor: explicit paths, conditions, fan-out and joins, limits, determinism."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from contracts.errors import DeadlineExceeded, ErrorCode, ToolFailed
from contracts.graphs import GraphDefinition
from services.graph.errors import (
    InvalidModelOutput,
    JoinIncomplete,
    NodeTimedOut,
    ReducerFailed,
    RunTimedOut,
    StepLimitExceeded,
    TurnLimitExceeded,
    VisitLimitExceeded,
)
from services.graph.executor import CompiledGraph, compile_library
from services.llm import Completion, ToolCallRequest

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

FAN_OUT = GraphDefinition.model_validate(
    {
        "name": "triage",
        "entry": "start",
        "nodes": {
            "start": {"kind": "respond", "template": "{input.ticket}"},
            "orders": {"kind": "tool", "tool": "orders", "output": "findings"},
            "incidents": {"kind": "tool", "tool": "incidents", "output": "findings"},
            "billing": {"kind": "tool", "tool": "billing", "output": "findings"},
            "merge": {"kind": "join", "wait": "all"},
            "decide": {"kind": "respond", "template": "{findings}"},
        },
        "edges": [
            {"from": "start", "to": ["orders", "incidents", "billing"]},
            {"from": "orders", "to": "merge"},
            {"from": "incidents", "to": "merge"},
            {"from": "billing", "to": "merge"},
            {"from": "merge", "to": "decide"},
        ],
        "reducers": {"findings": "append"},
    }
)


class Recorder:
    """An executor runtime whose tools answer from a table, optionally after a delay per tool."""

    def __init__(self, results=None, delays=None, model_answer="ok"):
        self.results = results or {}
        self.delays = delays or {}
        self.model_answer = model_answer
        self.calls: list[tuple[str, dict]] = []
        self.events: list[tuple[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def call_tool(self, tool, arguments, timeout):
        self.calls.append((tool, arguments))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if tool in self.delays:
                try:  # like a bus request, the call gives up after its timeout
                    async with asyncio.timeout(timeout):
                        await asyncio.sleep(self.delays[tool])  # a slow tool, not synchronisation
                except TimeoutError:
                    raise DeadlineExceeded(f"no reply within {timeout}s") from None
            result = self.results.get(tool, tool)
            if isinstance(result, Exception):
                raise result
            return result
        finally:
            self.in_flight -= 1

    async def call_model(self, model, messages, schema, timeout, tools):
        self.calls.append((f"model:{model}", {"messages": messages}))
        return Completion(content=self.model_answer)

    async def node_event(self, kind, node, elapsed_ms, data):
        self.events.append((kind, node))

    @property
    def runtime(self):
        return self  # call_tool, call_model and node_event: the executor's Runtime


async def run(definition, graph_input=None, recorder=None, timeout=5.0, library=None):
    recorder = recorder or Recorder()
    graph = (library or {}).get(definition.name) or CompiledGraph(definition)
    return await graph.run(graph_input or {}, recorder.runtime, timeout=timeout), recorder


async def test_the_condition_picks_the_answer_branch_and_args_come_from_the_state():
    found = {"found": True, "order": {"id": "A-1", "status": "shipped"}}
    outcome, recorder = await run(ORDER_GRAPH, {"text": "where?"}, Recorder({"orders_lookup": found}))
    assert outcome.output == "Order A-1 is shipped."
    assert outcome.path == ("lookup", "answer")
    assert recorder.calls == [("orders_lookup", {"query": "where?"})]


async def test_the_default_edge_is_taken_when_no_condition_holds():
    outcome, _ = await run(ORDER_GRAPH, {}, Recorder({"orders_lookup": {"found": False}}))
    assert outcome.path == ("lookup", "not_found")


async def test_every_node_reports_started_and_completed():
    _, recorder = await run(ORDER_GRAPH, {}, Recorder({"orders_lookup": {"found": False}}))
    assert recorder.events == [
        ("node_started", "lookup"),
        ("node_completed", "lookup"),
        ("node_started", "not_found"),
        ("node_completed", "not_found"),
    ]


async def test_a_fan_out_runs_its_branches_concurrently_and_the_join_waits_for_all():
    recorder = Recorder(delays={"orders": 0.02, "incidents": 0.01, "billing": 0.0})
    outcome, _ = await run(FAN_OUT, {"ticket": "t"}, recorder)
    assert recorder.max_in_flight == 3
    assert outcome.path == ("start", "orders", "incidents", "billing", "merge", "decide")
    assert outcome.state["merge"] == {"orders": "orders", "incidents": "incidents", "billing": "billing"}


async def test_the_result_does_not_depend_on_which_branch_finishes_first():
    seen = set()
    for order in itertools.permutations([0.0, 0.005, 0.01]):
        delays = dict(zip(["orders", "incidents", "billing"], order, strict=True))
        outcome, _ = await run(FAN_OUT, {"ticket": "t"}, Recorder(delays=delays))
        seen.add((outcome.path, repr(outcome.state), outcome.output))
    assert len(seen) == 1
    # The reducer appended in declaration order, not completion order.
    assert outcome.state["findings"] == ["orders", "incidents", "billing"]


async def test_the_same_run_repeated_gives_the_same_path_state_and_output():
    graph = CompiledGraph(FAN_OUT)
    results = set()
    for _ in range(30):
        delays = {tool: random.random() / 200 for tool in ("orders", "incidents", "billing")}
        outcome = await graph.run({"ticket": "t"}, Recorder(delays=delays).runtime, timeout=5)
        results.add((outcome.path, repr(outcome.state)))
    assert len(results) == 1


async def test_an_any_join_goes_on_with_the_first_branch_and_drops_the_late_one():
    definition = GraphDefinition.model_validate(
        {
            "name": "race",
            "entry": "start",
            "nodes": {
                "start": {"kind": "respond", "template": "go"},
                "fast": {"kind": "tool", "tool": "fast"},
                "slow1": {"kind": "tool", "tool": "slow"},
                "slow2": {"kind": "respond", "template": "late"},
                "first": {"kind": "join", "wait": "any"},
                "done": {"kind": "respond", "template": "{first}"},
            },
            "edges": [
                {"from": "start", "to": ["fast", "slow1"]},
                {"from": "fast", "to": "first"},
                {"from": "slow1", "to": "slow2"},
                {"from": "slow2", "to": "first"},
                {"from": "first", "to": "done"},
            ],
        }
    )
    outcome, _ = await run(definition)
    assert outcome.state["first"] == {"fast": "fast"}
    assert outcome.path.count("done") == 1


async def test_a_join_whose_branch_went_elsewhere_fails_clearly():
    definition = GraphDefinition.model_validate(
        {
            "name": "broken",
            "entry": "start",
            "nodes": {
                "start": {"kind": "respond", "template": "go"},
                "a": {"kind": "respond", "template": "a"},
                "b": {"kind": "respond", "template": "b"},
                "elsewhere": {"kind": "respond", "template": "x"},
                "join": {"kind": "join"},
            },
            "edges": [
                {"from": "start", "to": ["a", "b"]},
                {"from": "a", "to": "join"},
                {"from": "b", "to": "elsewhere", "when": "true"},
                {"from": "b", "to": "join"},
            ],
        }
    )
    with pytest.raises(JoinIncomplete, match=r"waiting for \['b'\]") as failure:
        await run(definition)
    assert failure.value.code is ErrorCode.INVALID_REQUEST  # the definition's shape, not Corral failing


async def test_a_cycle_stops_at_its_visit_limit():
    definition = GraphDefinition.model_validate(
        {
            "name": "loop",
            "entry": "a",
            "nodes": {"a": {"kind": "respond", "template": "again", "max_visits": 3}},
            "edges": [{"from": "a", "to": "a"}],
        }
    )
    with pytest.raises(VisitLimitExceeded, match="3 visits") as failure:
        await run(definition)
    assert failure.value.code is ErrorCode.LIMIT_EXCEEDED


async def test_a_cycle_that_exits_by_condition_runs_until_the_condition_holds():
    definition = GraphDefinition.model_validate(
        {
            "name": "retry",
            "entry": "attempt",
            "reducers": {"tries": "append"},
            "nodes": {
                "attempt": {"kind": "tool", "tool": "flaky", "output": "tries", "max_visits": 5},
                "done": {"kind": "respond", "template": "after {tries}"},
            },
            "edges": [
                {"from": "attempt", "to": "done", "when": "tries[2] == 'flaky'"},
                {"from": "attempt", "to": "attempt"},
            ],
        }
    )
    outcome, _ = await run(definition)
    assert outcome.path == ("attempt", "attempt", "attempt", "done")


async def test_the_global_step_limit_fires():
    definition = GraphDefinition.model_validate(
        {
            "name": "loop",
            "entry": "a",
            "max_steps": 4,
            "nodes": {"a": {"kind": "respond", "template": "x", "max_visits": 100}},
            "edges": [{"from": "a", "to": "a"}],
        }
    )
    with pytest.raises(StepLimitExceeded, match="4 steps") as failure:
        await run(definition)
    assert failure.value.code is ErrorCode.LIMIT_EXCEEDED


async def test_a_reducer_that_cannot_combine_the_outputs_is_a_definition_error():
    definition = GraphDefinition.model_validate(
        {
            "name": "totals",
            "entry": "count",
            "reducers": {"total": "sum"},
            "nodes": {
                "count": {"kind": "tool", "tool": "count", "output": "total"},
                "label": {"kind": "tool", "tool": "label", "output": "total"},
            },
            "edges": [{"from": "count", "to": "label"}],
        }
    )
    with pytest.raises(ReducerFailed, match="reducer 'sum' cannot combine the outputs written to 'total'") as failure:
        await run(definition, recorder=Recorder({"count": 3, "label": "three"}))
    assert failure.value.code is ErrorCode.INVALID_REQUEST


async def test_a_node_timeout_fires_and_is_reported():
    definition = ORDER_GRAPH.model_copy(deep=True)
    slow = GraphDefinition.model_validate(
        {
            **definition.model_dump(by_alias=True),
            "nodes": {
                **definition.model_dump(by_alias=True)["nodes"],
                "lookup": {"kind": "tool", "tool": "orders_lookup", "timeout_s": 0.02},
            },
        }
    )
    recorder = Recorder(delays={"orders_lookup": 5})
    with pytest.raises(NodeTimedOut, match="lookup"):
        await run(slow, recorder=recorder)
    assert recorder.events[-1] == ("node_failed", "lookup")


async def test_the_run_deadline_fires():
    with pytest.raises(RunTimedOut):
        await run(ORDER_GRAPH, recorder=Recorder(delays={"orders_lookup": 5}), timeout=0.03)


async def test_the_run_deadline_fires_when_the_tool_call_would_outlast_it():
    """A graph of tool and respond nodes gives each call what is left of the run, no more."""
    recorder = Recorder(delays={"orders_lookup": 5})
    # The node's own timeout (10 s) would have been a NodeTimedOut.
    with pytest.raises(RunTimedOut, match=r"within 0\.05s"):
        await run(ORDER_GRAPH, recorder=recorder, timeout=0.05)


async def test_the_run_deadline_fires_around_a_function_node():
    definition = GraphDefinition.model_validate(
        {
            "name": "slow",
            "entry": "wait",
            "nodes": {
                "wait": {
                    "kind": "function",
                    "callable": "tests.unit.graph_functions:wait",
                    "args": {"seconds": 5},
                    "timeout_s": 10,
                }
            },
        }
    )
    with pytest.raises(RunTimedOut):
        await run(definition, timeout=0.05)


async def test_a_failing_tool_fails_the_run_with_its_typed_error():
    recorder = Recorder({"orders": ToolFailed("orders service said 500")}, delays={"incidents": 0.01})
    with pytest.raises(ToolFailed, match="500"):
        await run(FAN_OUT, {"ticket": "t"}, recorder)


async def test_a_model_node_validates_its_answer_against_the_output_schema():
    definition = GraphDefinition.model_validate(
        {
            "name": "classify",
            "entry": "classify",
            "model": "scripted",
            "nodes": {
                "classify": {
                    "kind": "model",
                    "prompt": "Classify: {input.text}",
                    "system": "Be brief.",
                    "output_schema": {
                        "type": "object",
                        "required": ["label"],
                        "properties": {"label": {"type": "string"}},
                    },
                }
            },
        }
    )
    outcome, recorder = await run(definition, {"text": "refund"}, Recorder(model_answer='{"label": "billing"}'))
    assert outcome.output == {"label": "billing"}
    assert recorder.calls[0][1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Classify: refund"},
    ]
    with pytest.raises(InvalidModelOutput, match="output schema"):
        await run(definition, {"text": "x"}, Recorder(model_answer='{"nope": 1}'))


async def test_a_function_node_calls_the_operators_function_with_resolved_args():
    definition = GraphDefinition.model_validate(
        {
            "name": "fn",
            "entry": "f",
            "nodes": {
                "f": {
                    "kind": "function",
                    "callable": "tests.unit.graph_functions:add",
                    "args": {"a": "$input.x", "b": 2},
                }
            },
        }
    )
    outcome, _ = await run(definition, {"x": 40})
    assert outcome.output == 42


async def test_a_subgraph_runs_with_its_own_input_and_returns_its_output():
    inner = GraphDefinition.model_validate(
        {
            "name": "inner",
            "entry": "say",
            "nodes": {"say": {"kind": "respond", "template": "inner got {input.q}"}},
        }
    )
    outer = GraphDefinition.model_validate(
        {
            "name": "outer",
            "entry": "call",
            "nodes": {
                "call": {"kind": "subgraph", "graph": "inner", "input": {"q": "$input.text"}},
                "wrap": {"kind": "respond", "template": "[{call}]"},
            },
            "edges": [{"from": "call", "to": "wrap"}],
        }
    )
    library = compile_library({"inner": inner, "outer": outer})
    outcome, _ = await run(outer, {"text": "hi"}, library=library)
    assert outcome.output == "[inner got hi]"


async def test_the_graph_output_can_name_a_state_path():
    definition = FAN_OUT.model_copy(update={"output": "merge.orders"})
    outcome, _ = await run(definition, {"ticket": "t"})
    assert outcome.output == "orders"


class ScriptedAgent(Recorder):
    """A model that asks for the tools in ``plan`` one turn at a time, then answers."""

    def __init__(self, plan, results=None):
        super().__init__(results)
        self.plan = list(plan)
        self.seen_tools = None
        self.transcripts = []

    async def call_model(self, model, messages, schema, timeout, tools):
        self.seen_tools = tools
        self.transcripts.append(list(messages))
        if self.plan:
            name, arguments = self.plan.pop(0)
            return Completion(
                content="", tool_calls=(ToolCallRequest(id=f"c{len(self.plan)}", name=name, arguments=arguments),)
            )
        return Completion(content="done")


AGENT = GraphDefinition.model_validate(
    {
        "name": "assistant",
        "entry": "agent",
        "model": "m",
        "nodes": {"agent": {"kind": "agent", "prompt": "{input.text}", "tools": ["orders_lookup"], "max_turns": 4}},
    }
)


async def test_an_agent_node_calls_tools_until_the_model_answers():
    agent = ScriptedAgent([("orders_lookup", {"query": "A-1"})], results={"orders_lookup": {"found": True}})
    outcome, _ = await run(AGENT, {"text": "where?"}, agent)
    assert outcome.output == {"answer": "done", "tool_calls": 1}
    assert agent.calls[0] == ("orders_lookup", {"query": "A-1"})
    assert [tool["name"] for tool in agent.seen_tools] == ["orders_lookup"]
    assert agent.transcripts[-1][-1] == {"role": "tool", "tool_call_id": "c0", "content": '{"found": true}'}


async def test_an_agent_asking_for_a_tool_it_was_not_given_gets_a_refusal_not_the_tool():
    agent = ScriptedAgent([("delete_everything", {})])
    outcome, _ = await run(AGENT, {"text": "x"}, agent)
    assert all(call[0] != "delete_everything" for call in agent.calls)
    assert '"error": "forbidden"' in agent.transcripts[-1][-1]["content"]
    assert outcome.output["answer"] == "done"


async def test_an_agent_that_never_answers_stops_at_its_turn_limit():
    agent = ScriptedAgent([("orders_lookup", {})] * 10)
    with pytest.raises(TurnLimitExceeded, match="4 turns") as failure:
        await run(AGENT, {"text": "x"}, agent)
    assert failure.value.code is ErrorCode.LIMIT_EXCEEDED
