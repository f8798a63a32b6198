"""Corral's sides of ``corral bench workflow`` run on a system of their own, with tiny counts:
latency and throughput on one workflow replica, then a second replica is started and one of the
two is killed with SIGKILL mid-way through the recovery runs, which all complete."""

from __future__ import annotations

from corral.bench.workflow import CORRAL_SIDES, corral_side
from corral.bench.workflow_others import Counts

TINY = Counts(warmup=1, latency_runs=3, throughput_runs=6, concurrency=2, recovery_runs=2)


async def test_both_sides_report_figures_and_recover_after_a_replica_is_killed() -> None:
    results = await corral_side(TINY, quiet=True)

    assert set(results) == set(CORRAL_SIDES)
    for side, figures in results.items():
        for name in ("p50_ms", "p99_ms", "rps", "recovery_s", "watched_p50_ms", "paired_p50_ms", "paired_floor_p50_ms"):
            assert figures[name] > 0, (side, name, figures[name])
        assert figures["p99_ms"] >= figures["p50_ms"]
