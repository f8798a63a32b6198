"""Corral's side of ``corral bench swarm`` runs the conversation over the bus on a system of its
own and measures it, with tiny counts."""

from __future__ import annotations

import pytest

from corral.bench.swarm import ConversationError, check_turn, corral_side
from corral.bench.workflow_others import Counts

TINY = Counts(warmup=1, latency_runs=3, throughput_runs=6, concurrency=2)


async def test_corral_side_reports_positive_figures() -> None:
    figures = await corral_side(TINY)

    for name in ("p50_ms", "p99_ms", "rps"):
        assert figures[name] > 0, (name, figures[name])
    assert figures["p99_ms"] >= figures["p50_ms"]


def test_a_turn_that_skipped_an_agent_is_not_counted_as_the_conversation() -> None:
    skipped = {
        "agent": "bench_agent_c",
        "message": "Done at step 2.",
        "handoffs": [{"from": "bench_agent_a", "to": "bench_agent_c"}],
        "tool_calls": 2,
    }

    with pytest.raises(ConversationError):
        check_turn(skipped)
