"""``corral bench``: Corral's request path against a raw nats-py chain, and its graph runs
against LangGraph in process, all measured in the same run on the same machine.

- Throughput and latency: client -> router -> graph -> tool and back (the ``order_status``
  graph), against a raw chain of three forwarding processes with the same shape. Latency is
  measured one request at a time, throughput with ``concurrency`` requests in flight, without
  progress events (the raw chain has none); ``corral_stream_rps`` is the same with events on.
- Graph runs: the five-node ``bench_five`` graph per run over the bus, against the same graph
  compiled with LangGraph and called with ``invoke``.

Each round measures both contenders back to back (in alternating order), so they share the
machine's noise of that moment; ``ratio`` and ``graph_vs_langgraph`` are medians of the rounds'
ratios, throughputs medians over the rounds, latencies percentiles of all the run's samples.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from corral.bench.cpu import MonitorShare
from corral.bench.langgraph_side import build_invoke
from corral.bench.raw import start_chain
from corral.nats_server import free_port
from services.runtime.credentials import load_secrets
from services.runtime.loop import loop_name

TENANT = "bench"
ROUNDS = 5
Call = Callable[[], Awaitable[Any]]


async def _latency(call: Call, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _latency_in_process(call: Callable[[], Any], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def _throughput(call: Call, count: int, concurrency: int) -> float:
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_bench(
    *,
    state_dir: Path | None,
    nats_url: str | None,
    requests: int = 2000,
    concurrency: int = 64,
    rounds: int = ROUNDS,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the benchmark; starts its own system on free ports unless ``nats_url`` is given."""
    from corral.client import CorralClient
    from corral.system import PAYMENTS, System
    from services.auth.tokens import mint_dev_token

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    samples: dict[str, list[float]] = {}

    def record(name: str, values: list[float] | float) -> None:
        samples.setdefault(name, []).extend(values if isinstance(values, list) else [values])

    with tempfile.TemporaryDirectory(prefix="corral-bench-") as scratch:
        system = None
        if nats_url is None:
            state_dir = Path(scratch) / "state"
            say("starting a system on free ports...")
            system = await System(
                state_dir, port=free_port(), log_dir=Path(scratch) / "logs", env={"CORRAL_LOG_LEVEL": "warning"}
            ).start()
            nats_url = system.url
        assert state_dir is not None
        secrets = load_secrets(state_dir)
        processes, raw_call, raw_nc = await start_chain(nats_url, secrets.passwords["admin"])
        client = await CorralClient.connect(
            nats_url, tenant=TENANT, token=mint_dev_token(TENANT, key=secrets.dev_key, ttl_s=3600)
        )
        langgraph_invoke = build_invoke()
        try:

            async def corral_call() -> Any:
                return await client.request("where is my order?", target="order_status", watch=False, timeout=10)

            async def corral_stream_call() -> Any:
                return await client.request("where is my order?", target="order_status", watch=True, timeout=10)

            async def graph_call() -> Any:
                return await client.request("where is my order?", target="bench_five", watch=False, timeout=10)

            say(f"corral answers: {(await corral_call()).output}")
            count = max(50, requests // 4)

            async def corral_graph_runs() -> None:
                await _latency(graph_call, 20)  # warm-up
                runs = await _latency(graph_call, count)
                record("graph_latency", runs)
                record("graph_round_p50", percentile(runs, 0.5))

            def langgraph_runs() -> None:  # back to back in process: LangGraph's best case
                if langgraph_invoke is not None:
                    _latency_in_process(langgraph_invoke, 20)
                    runs = _latency_in_process(langgraph_invoke, count)
                    record("langgraph_latency", runs)
                    record("langgraph_round_p50", percentile(runs, 0.5))

            # The monitor's cost: Corral's throughput again with the monitor paused (SIGSTOP: it
            # polls nobody meanwhile), before the round's measurements or after them, alternately.
            monitors = [p.process for p in system.processes if p.name == "monitor"] if system is not None else []
            # And its share of the system's CPU in the Corral phases (corral/bench/cpu.py): the
            # monitor's CPU plus the services' answering its polls, per second it ran.
            share = None
            if system is not None and monitors:
                services: dict[str, int] = {}
                for process in system.processes:
                    if process.name != PAYMENTS:
                        services[process.name] = services.get(process.name, 0) + 1
                share = MonitorShare(
                    raw_nc, [child["pid"] for child in system.children()], {m.pid for m in monitors}, services
                )
                await share.calibrate()
                await share.resume()

            async def measured(phase: Awaitable[Any]) -> Any:
                return await (phase if share is None else share.measured(phase))

            async def unmonitored() -> None:
                if share is not None:
                    await share.pause()
                for monitor in monitors:
                    os.kill(monitor.pid, signal.SIGSTOP)
                try:
                    record("corral_rps_unmonitored", await _throughput(corral_call, requests, concurrency))
                finally:
                    for monitor in monitors:
                        os.kill(monitor.pid, signal.SIGCONT)
                    if share is not None:
                        await share.resume()

            contenders = (("raw", raw_call), ("corral", corral_call))
            for round_number in range(rounds):
                if monitors and round_number % 2 == 0:
                    await unmonitored()
                for name, call in contenders if round_number % 2 == 0 else contenders[::-1]:

                    async def contender(name: str = name, call: Call = call) -> None:
                        await _latency(call, 20)  # warm-up
                        record(f"{name}_latency", await _latency(call, count))
                        record(f"{name}_rps", await _throughput(call, requests, concurrency))

                    await (measured(contender()) if name == "corral" else contender())
                if monitors and round_number % 2 == 1:
                    await unmonitored()
                if monitors:
                    record("monitor_ratio", samples["corral_rps"][-1] / samples["corral_rps_unmonitored"][-1])
                record("ratio", samples["corral_rps"][-1] / samples["raw_rps"][-1])
                record(
                    "corral_stream_rps",
                    await measured(_throughput(corral_stream_call, requests // 2, concurrency)),
                )
                # The graph runs, Corral's and LangGraph's, in alternating order too: whichever
                # comes first also meets what the throughput phase left behind (audit appends).
                if round_number % 2 == 0:
                    await measured(corral_graph_runs())
                    langgraph_runs()
                else:
                    langgraph_runs()
                    await measured(corral_graph_runs())
                say(
                    f"round {round_number + 1}: raw {samples['raw_rps'][-1]:.0f} req/s, "
                    f"corral {samples['corral_rps'][-1]:.0f} req/s, ratio {samples['ratio'][-1]:.2f}"
                )
            if share is not None:
                await share.pause()
        finally:
            await client.close()
            await raw_nc.close()
            for process in processes:
                process.kill()
                await process.wait()
            if system is not None:
                system.stop()

    report: dict[str, Any] = {
        "corral_rps": round(statistics.median(samples["corral_rps"]), 1),
        "raw_rps": round(statistics.median(samples["raw_rps"]), 1),
        "corral_stream_rps": round(statistics.median(samples["corral_stream_rps"]), 1),
        "corral_p50_ms": round(percentile(samples["corral_latency"], 0.5), 3),
        "corral_p99_ms": round(percentile(samples["corral_latency"], 0.99), 3),
        "raw_p50_ms": round(percentile(samples["raw_latency"], 0.5), 3),
        "raw_p99_ms": round(percentile(samples["raw_latency"], 0.99), 3),
        "graph_p50_ms": round(percentile(samples["graph_latency"], 0.5), 3),
        "graph_p99_ms": round(percentile(samples["graph_latency"], 0.99), 3),
        "langgraph_p50_ms": None,
        "langgraph_p99_ms": None,
        "graph_vs_langgraph": None,
        "graph_round_ratios": [],
        "requests": requests,
        "concurrency": concurrency,
        "event_loop": loop_name(),  # of every process: the bench, the services and the raw chain
        "rounds": rounds,
        # The median of the rounds' ratios (each round measures both back to back), and each round's.
        "ratio": round(statistics.median(samples["ratio"]), 3),
        "round_ratios": [round(ratio, 3) for ratio in samples["ratio"]],
        # Corral's throughput with the monitor running over without it (paused), median of the rounds.
        "monitor_ratio": round(statistics.median(samples["monitor_ratio"]), 3) if "monitor_ratio" in samples else None,
        "monitor_round_ratios": [round(ratio, 3) for ratio in samples.get("monitor_ratio", [])],
        # The monitor's CPU plus the services' answering its polls (per second it ran, times the
        # Corral phases' duration) over the system's CPU in those phases (corral/bench/cpu.py).
        "monitor_cpu_share": None if share is None or share.share is None else round(share.share, 4),
        "monitor_cpu_s": None if share is None else round(share.monitor_s, 4),
        "monitor_answering_cpu_s": None if share is None else round(share.answering_s, 4),
        "monitor_running_s": None if share is None else round(share.running_s, 2),
        "system_cpu_per_s": None if share is None or not share.phases_s else round(share.system_s / share.phases_s, 3),
    }
    if "langgraph_latency" in samples:
        report["langgraph_p50_ms"] = round(percentile(samples["langgraph_latency"], 0.5), 3)
        report["langgraph_p99_ms"] = round(percentile(samples["langgraph_latency"], 0.99), 3)
        # Corral's p50 over LangGraph's, round by round (below 1: Corral is faster); the median.
        pairs = zip(samples["graph_round_p50"], samples["langgraph_round_p50"], strict=True)
        graph_ratios = [corral / langgraph for corral, langgraph in pairs]
        report["graph_vs_langgraph"] = round(statistics.median(graph_ratios), 3)
        report["graph_round_ratios"] = [round(ratio, 3) for ratio in graph_ratios]
    say(f"\nrequest path (client -> router -> graph -> tool -> client), {concurrency} in flight:")
    for name in ("corral", "raw"):
        say(
            f"  {name:>6}: {report[name + '_rps']:8.0f} req/s   p50 {report[name + '_p50_ms']:.2f} ms   "
            f"p99 {report[name + '_p99_ms']:.2f} ms"
        )
    say(
        f"  ratio (corral/raw throughput, median of the rounds): {report['ratio']}; with progress events: "
        f"{report['corral_stream_rps']:.0f} req/s"
    )
    if report["monitor_ratio"] is not None:
        say(f"  with the monitor running / paused (median of the rounds): {report['monitor_ratio']}")
    if report["monitor_cpu_share"] is not None:
        say(
            f"  the monitor's share of the system's CPU: {report['monitor_cpu_share']:.2%} (monitor "
            f"{report['monitor_cpu_s']} s + answering its polls {report['monitor_answering_cpu_s']} s in "
            f"{report['monitor_running_s']} s; the system {report['system_cpu_per_s']} CPU s/s under load)"
        )
    say("five-node graph, one run at a time:")
    say(f"  corral over the bus: p50 {report['graph_p50_ms']:.2f} ms   p99 {report['graph_p99_ms']:.2f} ms")
    if report["langgraph_p50_ms"] is None:
        say("  langgraph: not installed (pip install -e '.[bench]')")
    else:
        say(
            f"  langgraph invoke in process: p50 {report['langgraph_p50_ms']:.2f} ms   "
            f"p99 {report['langgraph_p99_ms']:.2f} ms"
        )
        say(f"  corral/langgraph p50 (median of the rounds): {report['graph_vs_langgraph']}")
    return report
