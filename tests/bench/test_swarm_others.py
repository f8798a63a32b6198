"""The in-process sides of ``corral bench swarm`` run the benchmark's conversation for real: three
agents, a -> b -> c, the tool called by a and b with the results the next step needs, c answering;
and a side measures only conversations that went so."""

from __future__ import annotations

import json
import sys

import pytest

from corral.bench import swarm_others
from corral.bench.swarm_others import ANSWER, A, B, C, ConversationError, run_others, run_others_async
from corral.bench.workflow_others import Counts

TINY = Counts(warmup=1, latency_runs=3, throughput_runs=6, concurrency=2)


async def test_the_openai_agents_conversation_goes_from_a_to_b_to_c_with_two_tool_calls() -> None:
    pytest.importorskip("agents")
    from agents import HandoffOutputItem, ToolCallItem, ToolCallOutputItem

    result = await swarm_others.build_openai_agents()()

    assert result.last_agent.name == C
    assert result.final_output == ANSWER
    handoffs = [
        (i.source_agent.name, i.target_agent.name) for i in result.new_items if isinstance(i, HandoffOutputItem)
    ]
    assert handoffs == [(A, B), (B, C)]
    calls = [(i.agent.name, i.raw_item.name) for i in result.new_items if isinstance(i, ToolCallItem)]
    assert calls == [(A, "bench_step"), (B, "bench_step")]
    outputs = [(i.agent.name, i.output) for i in result.new_items if isinstance(i, ToolCallOutputItem)]
    assert outputs == [(A, {"value": 1}), (B, {"value": 2})]


async def test_the_strands_conversation_goes_from_a_to_b_to_c_with_two_tool_calls() -> None:
    pytest.importorskip("strands")
    from strands.multiagent.base import Status

    swarm = swarm_others.build_strands_swarm()

    result = await swarm.invoke_async(swarm_others.MESSAGE)

    assert result.status is Status.COMPLETED
    assert [node.node_id for node in result.node_history] == [A, B, C]
    assert result.results[C].result.message["content"][0]["text"] == ANSWER

    def tool_results(agent: str) -> list[tuple[str, str]]:
        """(tool, result text) of each tool call the agent made, from its own conversation."""
        messages = swarm.nodes[agent].executor.messages
        names = {
            b["toolUse"]["toolUseId"]: b["toolUse"]["name"] for m in messages for b in m["content"] if "toolUse" in b
        }
        return [
            (names[b["toolResult"]["toolUseId"]], b["toolResult"]["content"][0]["text"])
            for m in messages
            for b in m["content"]
            if "toolResult" in b
        ]

    assert tool_results(A) == [
        ("bench_step", json.dumps({"value": 1})),
        ("handoff_to_agent", f"Handing off to {B}: step 1 done"),
    ]
    assert tool_results(B) == [
        ("bench_step", json.dumps({"value": 2})),
        ("handoff_to_agent", f"Handing off to {C}: step 2 done"),
    ]
    assert tool_results(C) == []


@pytest.mark.parametrize(("side", "package"), [("openai_agents", "agents"), ("strands", "strands")])
def test_a_side_reports_positive_figures(side: str, package: str) -> None:
    pytest.importorskip(package)

    figures = run_others(sides=(side,), counts=TINY)[side]

    assert "error" not in figures, figures["error"]
    for name in ("p50_ms", "p99_ms", "rps"):
        assert figures[name] > 0, (name, figures[name])
    assert figures["p99_ms"] >= figures["p50_ms"]


async def test_a_conversation_that_ends_elsewhere_is_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("agents")
    # b answers instead of handing off to c: the run ends with b, and the side says so.
    monkeypatch.setitem(swarm_others._AGENTS_SCRIPTS, B, swarm_others._Script((), "b answers itself"))

    with pytest.raises(ConversationError, match=B):
        await swarm_others.build_openai_agents()()
    measured = await run_others_async(sides=("openai_agents",), counts=TINY)
    assert "b answers itself" in measured["openai_agents"]["error"]


def test_a_side_without_its_package_reports_an_error_instead_of_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "strands", None)  # what an import of an absent package does

    results = run_others(sides=("strands",), counts=TINY)

    assert "bench extra" in results["strands"]["error"]
