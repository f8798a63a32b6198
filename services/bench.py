"""``corral bench``: Corral's router -> graph -> tool round trip against a raw nats-py chain.

Both are measured in the same run, on the same broker, with the same shape: a client request
that crosses three services, each a separate process doing a nested request/reply. The raw chain
is the floor (nats-py with no envelope, no validation, no guard); the ratio says what Corral's
per-message work costs. Latency is measured one request at a time; throughput with
``concurrency`` requests in flight. Rounds alternate between the two to share the machine's noise.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats

from services.runtime.nats_server import free_port
from services.runtime.state import load_secrets

RAW_HOPS = ("bench.router", "bench.graph", "bench.tools")
BENCH_TENANT = "bench"
BENCH_TARGET = "order_status"
ROUNDS = 3
Call = Callable[[], Awaitable[Any]]


async def _measure_latency(call: Call, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def _measure_throughput(call: Call, count: int, concurrency: int) -> float:
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _raw_chain(url: str, password: str) -> tuple[list[Any], Call, Any]:
    env = {**os.environ, "CORRAL_BENCH_URL": url, "CORRAL_BENCH_PASSWORD": password}
    processes = []
    for index, subject in enumerate(RAW_HOPS):
        forward = RAW_HOPS[index + 1] if index + 1 < len(RAW_HOPS) else ""
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.bench",
                "raw-hop",
                subject,
                forward,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        )
    for process in processes:  # each prints one line once subscribed
        assert process.stdout is not None
        await asyncio.wait_for(process.stdout.readline(), timeout=30)
    nc = await nats.connect(url, user="admin", password=password, inbox_prefix=b"_INBOX._admin")
    body = b'{"text": "where is my order?"}' * 4

    async def call() -> Any:
        return await nc.request(RAW_HOPS[0], body, timeout=10)

    return processes, call, nc


async def _raw_hop(subject: str, forward: str) -> None:
    """One process of the raw chain: forward each request to the next hop, or answer it."""
    nc = await nats.connect(
        os.environ["CORRAL_BENCH_URL"],
        user="admin",
        password=os.environ["CORRAL_BENCH_PASSWORD"],
        inbox_prefix=b"_INBOX._admin",
    )
    tasks: set[asyncio.Task[None]] = set()

    async def handle(msg: Any) -> None:
        data = (await nc.request(forward, msg.data, timeout=10)).data if forward else msg.data
        await msg.respond(data)

    async def on_message(msg: Any) -> None:
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await nc.subscribe(subject, queue="bench", cb=on_message)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent goes away


async def run_bench(
    *, state_dir: Path | None, nats_url: str | None, requests: int = 2000, concurrency: int = 64, quiet: bool = False
) -> dict[str, Any]:
    """Run the benchmark; starts its own system on free ports unless ``nats_url`` is given."""
    from services.auth.tokens import mint_dev_token
    from services.client import CorralClient
    from services.runtime.system import System

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    with tempfile.TemporaryDirectory(prefix="corral-bench-") as scratch:
        system = None
        if nats_url is None:
            state_dir = Path(scratch) / "state"
            say("starting a system on a free port...")
            system = await System(
                state_dir, port=free_port(), log_dir=Path(scratch) / "logs", env={"CORRAL_LOG_LEVEL": "warning"}
            ).start()
            nats_url = system.url
        assert state_dir is not None
        secrets = load_secrets(state_dir)
        processes, raw_call, raw_nc = await _raw_chain(nats_url, secrets.passwords["admin"])
        client = await CorralClient.connect(
            nats_url, tenant=BENCH_TENANT, token=mint_dev_token(BENCH_TENANT, key=secrets.dev_key, ttl_s=3600)
        )
        try:

            async def corral_call() -> Any:
                return await client.request("where is my order?", target=BENCH_TARGET, watch=False, timeout=10)

            first = await corral_call()
            say(f"corral answers: {first.output}")
            results: dict[str, dict[str, list[float]]] = {"corral": {}, "raw": {}}
            latency_count = max(50, requests // 4)
            for round_number in range(ROUNDS):
                for name, call in (("raw", raw_call), ("corral", corral_call)):
                    await _measure_latency(call, 20)  # warm-up
                    samples = await _measure_latency(call, latency_count)
                    rps = await _measure_throughput(call, requests, concurrency)
                    results[name].setdefault("latency", []).extend(samples)
                    results[name].setdefault("rps", []).append(rps)
                    say(f"round {round_number + 1} {name:>6}: {rps:8.0f} req/s, p50 {_percentile(samples, 0.5):.2f} ms")
        finally:
            await client.close()
            await raw_nc.close()
            for process in processes:
                process.kill()
                await process.wait()
            if system is not None:
                system.stop()

    report = {
        "corral_rps": round(statistics.median(results["corral"]["rps"]), 1),
        "raw_rps": round(statistics.median(results["raw"]["rps"]), 1),
        "corral_p50_ms": round(_percentile(results["corral"]["latency"], 0.5), 3),
        "corral_p99_ms": round(_percentile(results["corral"]["latency"], 0.99), 3),
        "raw_p50_ms": round(_percentile(results["raw"]["latency"], 0.5), 3),
        "raw_p99_ms": round(_percentile(results["raw"]["latency"], 0.99), 3),
        "requests": requests,
        "concurrency": concurrency,
        "rounds": ROUNDS,
        "hops": len(RAW_HOPS),
    }
    report["ratio"] = round(report["corral_rps"] / report["raw_rps"], 3)
    for name in ("corral", "raw"):
        say(
            f"{name:>6}: {report[name + '_rps']:.0f} req/s, p50 {report[name + '_p50_ms']} ms, "
            f"p99 {report[name + '_p99_ms']} ms"
        )
    say(f"ratio (corral/raw throughput): {report['ratio']}")
    return report


if __name__ == "__main__" and sys.argv[1:2] == ["raw-hop"]:
    asyncio.run(_raw_hop(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""))
