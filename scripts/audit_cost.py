"""What the audit writer costs per record, and how many broker round trips it takes:
``python scripts/audit_cost.py [--tenants 1 100 2000] [--rate 2000] [--seconds 3]``.

Starts a ``nats-server`` (JetStream, file storage), connects as the services do, on their event
loop, and drives one :class:`~services.runtime.audit.AuditTrail` (service ``tools``):

- *windows*: each window holds one record from every one of N active tenants and is written at
  once (``flushed()``). Per record: the writer's CPU (this process, ``record()`` included) and the
  broker's (the ``nats-server`` process, from ``/proc``, 10 ms ticks); per window: the round trips
  to the broker (the appends and head reads awaited in turn) and how long the write took.
- *load*: ``--rate`` records a second spread over N tenants for ``--seconds``, written the way a
  service writes them (every ``LINGER_S``). Per record: the writer's CPU; and the lag, the age of
  the oldest record not yet acknowledged, sampled every 20 ms (largest and median).
- *busy load*: the same while the event loop is as busy as a service's at full load: another task
  holds it ``--busy-ms`` at every turn (request handling, in a service). Lag and round trips only
  (the CPU is the spinner's).

Each tenant's first entry (which reads its chain's head) is written before anything is measured.
To measure another version of the writer, run a copy of this script placed in that version's
tree: it imports the tree it is in.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corral.nats_server import NatsServer
from services.runtime import connection
from services.runtime import loop as event_loop
from services.runtime.audit import LINGER_S, AuditTrail


class Quiet:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **fields: None


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Counted:
    """Round trips and write passes of one trail, for this version of the writer or an older one."""

    def __init__(self, trail: AuditTrail, nc: Any) -> None:
        self.trail = trail
        self.requests = 0  # the older writer awaited one request per append and per head
        self.passes = 0
        request, drain = nc.request, trail._drain

        async def counted_request(*args: Any, **kwargs: Any) -> Any:
            self.requests += 1
            return await request(*args, **kwargs)

        async def counted_drain() -> None:
            self.passes += 1
            await drain()

        nc.request = counted_request
        trail._drain = counted_drain

    def round_trips(self) -> int:
        stats = getattr(self.trail, "stats", None)
        return stats["round_trips"] if stats is not None else self.requests


def record_window(trail: AuditTrail, names: list[str], window: int) -> None:
    for name in names:
        trail.record(name, "tool_call", "ok", principal="dev", run_id=f"r-{window}", tool="orders_lookup")


async def windows(nc: Any, broker_pid: int, names: list[str], count: int) -> dict[str, float]:
    trail = AuditTrail(nc, "tools", Quiet())
    await trail.start()
    record_window(trail, names, -1)  # the heads, read once
    await trail.flushed(timeout=600)
    counted = Counted(trail, nc)
    rounds_before = counted.round_trips()
    cpu, broker, wall = time.process_time(), cpu_s(broker_pid), time.perf_counter()
    for window in range(count):
        record_window(trail, names, window)
        await trail.flushed(timeout=600)
    cpu, broker, wall = time.process_time() - cpu, cpu_s(broker_pid) - broker, time.perf_counter() - wall
    rounds = counted.round_trips() - rounds_before
    await trail.stop()
    records = count * len(names)
    return {
        "writer_us": cpu / records * 1e6,
        "broker_us": broker / records * 1e6,
        "round_trips": rounds / count,
        "window_ms": wall / count * 1e3,
    }


async def spin(stop: asyncio.Event, busy_s: float) -> None:
    """Hold the event loop ``busy_s`` at every turn, as a busy service's handlers do."""
    while not stop.is_set():
        until = time.perf_counter() + busy_s
        while time.perf_counter() < until:
            pass
        await asyncio.sleep(0)


async def load(
    nc: Any, broker_pid: int, names: list[str], rate: float, seconds: float, busy_s: float = 0.0
) -> dict[str, float]:
    trail = AuditTrail(nc, "tools", Quiet())
    await trail.start()
    record_window(trail, names, -1)
    await trail.flushed(timeout=600)
    counted = Counted(trail, nc)
    rounds_before = counted.round_trips()
    lags: list[float] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            pending = trail._pending
            if pending:
                oldest = next(iter(pending.values()))
                if oldest:
                    at = datetime.fromisoformat(oldest[0]["at"])
                    lags.append((datetime.now(UTC) - at).total_seconds())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    spinner = asyncio.create_task(spin(stop, busy_s)) if busy_s else None
    tick_s, sent, n = 0.005, 0, 0
    cpu, broker, start = time.process_time(), cpu_s(broker_pid), time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        due = int(elapsed * rate)
        for _ in range(due - sent):
            trail.record(names[n % len(names)], "tool_call", "ok", principal="dev", tool="orders_lookup")
            n += 1
        sent = due
        await asyncio.sleep(tick_s)
    await trail.flushed(timeout=600)
    cpu, broker = time.process_time() - cpu, cpu_s(broker_pid) - broker
    stop.set()
    await sampler
    if spinner is not None:
        await spinner
    await trail.stop()
    passes = max(1, counted.passes)
    return {
        "writer_us": cpu / max(1, sent) * 1e6,
        "broker_us": broker / max(1, sent) * 1e6,
        "round_trips": (counted.round_trips() - rounds_before) / passes,
        "lag_max_s": max(lags, default=0.0),
        "lag_p50_s": statistics.median(lags) if lags else 0.0,
    }


async def main(tenant_counts: list[int], rate: float, seconds: float, busy_ms: float) -> None:
    with tempfile.TemporaryDirectory() as store, NatsServer(args=["-js", "-sd", store]) as server:
        assert server.process is not None
        nc = await connection.connect(server.url, pending_size=8 * 1024 * 1024)
        try:
            print(f"writer: {AuditTrail.__module__} ({sys.modules[AuditTrail.__module__].__file__})")
            print("windows (one record from every active tenant per window, written at once)")
            print(f"{'tenants':>8} {'writer µs/rec':>14} {'broker µs/rec':>14} {'round trips/window':>19}", end="")
            print(f" {'ms/window':>10}")
            for count in tenant_counts:
                names = [f"bench{count}-{n:05d}" for n in range(count)]
                result = await windows(nc, server.process.pid, names, max(3, 4000 // count))
                print(
                    f"{count:>8} {result['writer_us']:>14.1f} {result['broker_us']:>14.1f}"
                    f" {result['round_trips']:>19.1f} {result['window_ms']:>10.1f}"
                )
            print(f"load ({rate:g} records/s for {seconds:g} s, written every {LINGER_S * 1000:g} ms)")
            print(f"{'tenants':>8} {'writer µs/rec':>14} {'broker µs/rec':>14} {'round trips/pass':>17}", end="")
            print(f" {'lag p50 s':>10} {'lag max s':>10}")
            for count in tenant_counts:
                names = [f"load{count}-{n:05d}" for n in range(count)]
                result = await load(nc, server.process.pid, names, rate, seconds)
                costs = f"{result['writer_us']:>14.1f} {result['broker_us']:>14.1f}"
                lags = f"{result['lag_p50_s']:>10.3f} {result['lag_max_s']:>10.3f}"
                print(f"{count:>8} {costs} {result['round_trips']:>17.1f} {lags}")
            print(f"busy load (the same, the loop held {busy_ms:g} ms at every turn)")
            print(f"{'tenants':>8} {'round trips/pass':>17} {'lag p50 s':>10} {'lag max s':>10}")
            for count in tenant_counts:
                names = [f"busy{count}-{n:05d}" for n in range(count)]
                result = await load(nc, server.process.pid, names, rate, seconds, busy_ms / 1000)
                lags = f"{result['lag_p50_s']:>10.3f} {result['lag_max_s']:>10.3f}"
                print(f"{count:>8} {result['round_trips']:>17.1f} {lags}")
        finally:
            await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, nargs="+", default=[1, 100, 2000], help="active tenants")
    parser.add_argument("--rate", type=float, default=2000, help="records a second in the load part")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each load run")
    parser.add_argument("--busy-ms", type=float, default=0.5, help="how long the loop is held at every turn")
    args = parser.parse_args()
    event_loop.run(main(args.tenants, args.rate, args.seconds, args.busy_ms))
