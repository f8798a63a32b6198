"""``corral bench workflow``: the same five-step workflow on Corral and, in the same run, on
Temporal, DBOS and the raw JetStream floor (:mod:`corral.bench.workflow_others`).

Corral's sides run the demo's ``bench_wf_local`` workflow (``corral``: five tool steps, each a
trivial Python tool called in the workflow replica, as the floor calls its steps in its own
process) and ``bench_wf`` (``corral_remote``: the same steps, each called over the bus through
the tools service), on a system started here: per run one at a time (start through the
router, every step recorded in the history, the client following the run to its outcome, as
the other engines' clients wait for a result; ``watched_*``: the client watching every step's
events too) and runs per second with 32 in flight, with one workflow replica, as the other
engines have one worker; then a second replica is started, and the time to finish all runs
after a kill -9 of one of them mid-way is measured (the other takes the runs over once their
lease and wake-up expire). On this benchmark's two cores a second replica adds no core, only a
process more competing for them (docs/workflows.md#performance has both figures).
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from corral.bench import TENANT, percentile
from corral.bench.workflow_others import (
    DEFAULT,
    QUICK,
    Counts,
    measure_latencies,
    measure_paired,
    measure_throughput,
    run_others_async,
    running_floor,
)
from corral.nats_server import free_port
from services.runtime.credentials import load_secrets

# Corral's sides: the workflow each runs, and what its steps do. ``corral`` calls each step's tool
# where the floor calls its step, in the process that records the run; ``corral_remote`` sends
# each call to the tools service over the bus.
CORRAL_SIDES = {
    "corral": (
        "bench_wf_local",
        "five tool steps marked `local` (router, workflow engine): each tool called in the workflow "
        "replica with the tools service's checks, context and audit; every step's start and outcome "
        "appended to the run's JetStream history before the run goes on",
    ),
    "corral_remote": (
        "bench_wf",
        "the same five steps, each tool called through the tools service over the bus; the same history",
    ),
}
WATCH_NOTE = (
    "the client follows each run to its outcome (the run publishes only that); watched_*: the client "
    "watches every step's events as well (two per step)"
)
RECOVERY_NOTE = (
    "recovery: a second replica started, then one of the two killed with SIGKILL mid-way; the other "
    "takes its runs over (lease and wake-up: 2 s)"
)


async def corral_side(counts: Counts, *, quiet: bool = False, paired: bool = True) -> dict[str, dict[str, Any]]:
    """Both of Corral's sides (:data:`CORRAL_SIDES`) on one system, one after the other; a
    workflow replica is killed in each side's recovery measurement and restarted after it.
    ``paired``: each side's latency is also measured in turns with the floor's (run by
    :func:`~corral.bench.workflow_others.running_floor` beside the system), run for run."""
    from corral.client import CorralClient
    from corral.system import System
    from services.auth.tokens import mint_dev_token

    results: dict[str, dict[str, Any]] = {}
    fast = counts.fast()  # as many runs as the floor makes
    with tempfile.TemporaryDirectory(prefix="corral-bench-wf-") as scratch:
        state_dir = Path(scratch) / "state"
        system = await System(
            state_dir,
            port=free_port(),
            replicas={"workflow": 1},
            log_dir=Path(scratch) / "logs",
            env={"CORRAL_LOG_LEVEL": "warning"},
        ).start()
        try:
            secrets = load_secrets(state_dir)
            client = await CorralClient.connect(
                system.url, tenant=TENANT, token=mint_dev_token(TENANT, key=secrets.dev_key, ttl_s=3600)
            )

            def runner(target: str, *, watch: bool = False) -> Any:
                """A run to its end: the client follows its outcome (as the other engines' clients
                wait for the result), or with ``watch`` every step's events as well."""

                async def run(delay_ms: float = 0, on_event: Any = None) -> Any:
                    result = await client.request(
                        target=target,
                        input={"value": 0, "delay_ms": delay_ms},
                        timeout=60,
                        on_event=on_event,
                        watch=watch,
                        follow=True,
                    )
                    if result.output != 5:
                        raise RuntimeError(f"the workflow answered {result.output!r}, not 5")
                    return result

                return run

            try:
                for side, (target, notes) in CORRAL_SIDES.items():
                    samples = await measure_latencies(runner(target), fast)
                    watched = await measure_latencies(runner(target, watch=True), fast)
                    results[side] = {
                        "p50_ms": percentile(samples, 0.5),
                        "p99_ms": percentile(samples, 0.99),
                        "rps": await measure_throughput(runner(target), fast),
                        "watched_p50_ms": percentile(watched, 0.5),
                        "watched_rps": await measure_throughput(runner(target, watch=True), fast),
                        "runs": fast.latency_runs,
                        "notes": f"{notes}; one workflow replica; {WATCH_NOTE}; {RECOVERY_NOTE}",
                    }
                if paired:
                    async with running_floor() as floor:
                        for side, (target, _) in CORRAL_SIDES.items():
                            mine, floors = await measure_paired(runner(target), floor.run, fast)
                            results[side]["paired_p50_ms"] = percentile(mine, 0.5)
                            results[side]["paired_floor_p50_ms"] = percentile(floors, 0.5)
                await system.add_replica("workflow")
                for side, (target, _) in CORRAL_SIDES.items():
                    results[side]["recovery_s"] = await _recovery(system, runner(target, watch=True), counts)
            finally:
                await client.close()
        finally:
            system.stop()
    return results


async def _recovery(system: Any, run: Any, counts: Counts) -> float:
    """Start ``recovery_runs`` slowed runs, kill -9 a workflow replica once two fifths of their
    steps are done, and time from the kill until every run has completed."""
    steps_done = 0
    mid_way = asyncio.Event()
    target = max(1, counts.recovery_runs * 5 * 2 // 5)

    def on_event(event: Any) -> None:
        nonlocal steps_done
        if event.type.value == "step_completed":
            steps_done += 1
            if steps_done >= target:
                mid_way.set()

    runs = [asyncio.create_task(run(counts.step_delay_s * 1000, on_event)) for _ in range(counts.recovery_runs)]
    await mid_way.wait()
    victim = next(p for p in system.processes if p.name == "workflow")
    killed = time.perf_counter()
    os.killpg(victim.process.pid, signal.SIGKILL)
    await asyncio.gather(*runs)
    took = time.perf_counter() - killed
    await system.restart(victim)  # the next side starts with both replicas again
    return took


async def run_workflow_bench(
    *, quick: bool = False, sides: tuple[str, ...] = ("floor", "temporal", "dbos"), quiet: bool = False
) -> dict[str, Any]:
    """Every side, one after another; the report has each side's figures and the flat keys
    ``<side>_wf_p50_ms`` and ``<side>_wf_rps``, and Corral's ratios to the floor."""
    counts = QUICK if quick else DEFAULT
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    say("corral: starting a system (one workflow replica, a second for the recovery)...")
    results: dict[str, Any] = await corral_side(counts, quiet=quiet)
    for side in CORRAL_SIDES:
        say(f"{side}: p50 {results[side]['p50_ms']:.2f} ms, {results[side]['rps']:.0f} runs/s")
    results.update(await run_others_async(sides=sides, quick=quick))
    report: dict[str, Any] = {"sides": results}
    for side, figures in results.items():
        if "p50_ms" in figures:
            report[f"{side}_wf_p50_ms"] = round(figures["p50_ms"], 3)
            report[f"{side}_wf_rps"] = round(figures["rps"], 1)
            report[f"{side}_wf_recovery_s"] = figures.get("recovery_s")
            if "watched_p50_ms" in figures:
                report[f"{side}_wf_watched_p50_ms"] = round(figures["watched_p50_ms"], 3)
                report[f"{side}_wf_watched_rps"] = round(figures["watched_rps"], 1)
    floor = results.get("floor", {})
    if "p50_ms" in floor:
        for side in CORRAL_SIDES:
            report[f"{side}_vs_floor_p50"] = round(results[side]["p50_ms"] / floor["p50_ms"], 2)
            report[f"{side}_vs_floor_rps"] = round(results[side]["rps"] / floor["rps"], 3)
    for side in CORRAL_SIDES:
        figures = results[side]
        if "paired_p50_ms" in figures:  # the same moments: what the machine's drift cannot skew
            report[f"{side}_vs_floor_p50_paired"] = round(figures["paired_p50_ms"] / figures["paired_floor_p50_ms"], 2)
    temporal = results.get("temporal", {})
    if "rps" in temporal:
        report["corral_vs_temporal_rps"] = round(results["corral"]["rps"] / temporal["rps"], 1)
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"{'side':<14} {'p50 ms':>9} {'p99 ms':>9} {'runs/s':>9} {'recovery s':>11}"]
    for side, figures in report["sides"].items():
        if "error" in figures:
            lines.append(f"{side:<14} error: {figures['error']}")
            continue
        recovery = figures.get("recovery_s")
        shown = f"{recovery:.2f}" if isinstance(recovery, int | float) else "n/a"
        lines.append(
            f"{side:<14} {figures['p50_ms']:>9.2f} {figures['p99_ms']:>9.2f} {figures['rps']:>9.0f} {shown:>11}"
        )
    for key in (
        "corral_vs_floor_p50",
        "corral_vs_floor_p50_paired",
        "corral_vs_floor_rps",
        "corral_remote_vs_floor_p50",
        "corral_remote_vs_floor_p50_paired",
        "corral_remote_vs_floor_rps",
        "corral_vs_temporal_rps",
    ):
        if key in report:
            lines.append(f"{key}: {report[key]}")
    return "\n".join(lines)
