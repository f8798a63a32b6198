"""What the monitor costs with many tenants: one poll's ingest, one scrape, and its memory.

    python scripts/monitor_cost.py [--tenants 10000] [--ticks 5] [--readings-only]

Synthetic statistics: router, graph and tools replicas (one each) where every tenant sends a
message every second (the worst case: nothing idle), read as the poller reads them (every page,
through JSON), fed to the view; then the Prometheus exposition with the default top-K and with
every tenant labelled, and the JSON API's answers. Memory: tracemalloc of the view alone.

Then the CPU of one poll (``time.thread_time``, the median of five polls), the services' side
(building and encoding every page) and the monitor's (decoding and ingesting them), read in full
and incrementally (``since``), with every tenant idle and with one in a hundred active each second.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

from prometheus_client import generate_latest

from services.monitor.metrics import registry_for
from services.monitor.view import View
from services.runtime.stats import ServiceStats, parse_stats_request

OPERATIONS = (
    ("router", "request", "t.*.router.request.>"),
    ("graph", "run", "t.*.graph.run"),
    ("tools", "call", "t.*.tools.call"),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--ticks", type=int, default=5)
    parser.add_argument("--readings-only", action="store_true", help="only the full and incremental polls' CPU")
    args = parser.parse_args()
    if args.readings_only:
        _print_reading_costs(args.tenants)
        return
    tenants = [f"tenant-{i:05d}" for i in range(args.tenants)]
    replicas = []
    for service, name, subject in OPERATIONS:
        stats = ServiceStats(service, replica_id=f"{service}-1", max_tenants=max(10_000, args.tenants))
        replicas.append((service, stats, stats.operation(name, subject, service)))
    view = View()
    ingest_s = []
    for tick in range(args.ticks):
        if tick == args.ticks - 1:  # the last poll is measured for memory only (tracemalloc slows it)
            tracemalloc.start()
        for _, _, op in replicas:
            for i, tenant in enumerate(tenants):
                op.finish(op.start(tenant), 0.0005 * (1 + i % 7), error="tool_failed" if i % 97 == tick else None)
        pages = []
        for service, stats, _ in replicas:  # every page, as the services answer them
            after = None
            while True:
                page = json.dumps(stats.snapshot(after=after, limit=1000)).encode()
                pages.append((service, page))
                after = json.loads(page)["next"]
                if after is None:
                    break
        started = time.perf_counter()
        for service, page in pages:
            view.ingest(service, json.loads(page))
        view.end_tick()
        if not tracemalloc.is_tracing():
            ingest_s.append(time.perf_counter() - started)
    tracemalloc.stop()
    tracemalloc.start()
    size = _view_size(view, replicas)
    tracemalloc.stop()
    print(f"tenants: {args.tenants}, operations: {len(OPERATIONS)}, every tenant active every second")
    print(f"ingest of one poll (JSON decode + deltas): {min(ingest_s) * 1000:.0f} ms (of {len(pages)} pages)")
    print(f"memory of the monitor's figures (incl. the replicas' last readings): {size / 1e6:.1f} MB")
    for label, registry in (
        ("top 20", registry_for(view, top_k=20)),
        ("every tenant", registry_for(view, full_tenants=True)),
    ):
        times = []
        for _ in range(3):
            started = time.perf_counter()
            body = generate_latest(registry)
            times.append(time.perf_counter() - started)
        lines = body.count(b"\n")
        print(f"/metrics, {label}: {min(times) * 1000:.0f} ms, {len(body) / 1000:.0f} KB, {lines} lines")
    for label, call in (
        ("/api/tenants", lambda: json.dumps(view.rows())),
        ("/api/tenants?limit=20", lambda: json.dumps(view.rows(limit=20))),
        ("/api/tenants/<t>", lambda: json.dumps(view.detail(tenants[0]))),
    ):
        started = time.perf_counter()
        size = len(call())
        print(f"{label}: {(time.perf_counter() - started) * 1000:.1f} ms, {size / 1000:.0f} KB")
    _print_reading_costs(args.tenants)


def _print_reading_costs(count: int) -> None:
    print(f"one poll's CPU, {count} tenants x {len(OPERATIONS)} replicas (services / monitor):")
    for active, label in ((0.0, "all idle"), (0.01, "1 in 100 active")):
        for incremental in (False, True):
            services_s, monitor_s, entries = _reading_cost(count, active, incremental)
            how = "incremental" if incremental else "full"
            print(f"  {label:16} {how:12} {services_s * 1000:7.2f} ms / {monitor_s * 1000:7.2f} ms, {entries} entries")


def _reading_cost(count: int, active: float, incremental: bool, polls: int = 5) -> tuple[float, float, int]:
    """CPU seconds of one poll on the services' side and the monitor's (medians), and the tenant
    entries answered; ``active`` of the tenants handle a message between two polls."""
    tenants = [f"tenant-{i:05d}" for i in range(count)]
    replicas = []
    for service, name, subject in OPERATIONS:
        stats = ServiceStats(service, replica_id=f"{service}-1", max_tenants=max(10_000, count))
        op = stats.operation(name, subject, service)
        for tenant in tenants:
            op.finish(op.start(tenant), 0.0005)
        replicas.append((service, stats, op))
    view = View()
    since: dict[str, dict] = {}  # replica -> its last complete reading, as the poller keeps it
    services_s, monitor_s, entries = [], [], 0
    step = round(1 / active) if active else 0
    for poll in range(polls + 1):
        for _, _, op in replicas:
            for tenant in tenants[poll % step :: step] if step and poll else ():
                op.finish(op.start(tenant), 0.0005)
        answering = ingesting = 0.0
        entries = 0
        for service, stats, _ in replicas:
            after, follow = None, None
            while True:
                body: dict = {"after": after} if after else {}
                if incremental:
                    body["since"] = follow if after else since
                started = time.thread_time()
                page = json.dumps(stats.snapshot(**parse_stats_request(json.dumps(body).encode()))).encode()
                read = time.thread_time()
                reply = json.loads(page)
                view.ingest(service, reply)
                ingesting += time.thread_time() - read
                answering += read - started
                entries += sum(len(endpoint["tenants"]) for endpoint in reply["endpoints"])
                if incremental and after is None:
                    walk = {"started": reply["started"], "generation": reply["since"], "until": reply["generation"]}
                    follow = {stats.replica_id: walk}
                if (after := reply["next"]) is None:
                    if incremental:
                        since[stats.replica_id] = {"started": reply["started"], "generation": reply["generation"]}
                    break
        started = time.thread_time()
        view.end_tick()
        ingesting += time.thread_time() - started
        if poll:  # the first poll reads everything in full either way
            services_s.append(answering)
            monitor_s.append(ingesting)
    return sorted(services_s)[polls // 2], sorted(monitor_s)[polls // 2], entries


def _view_size(view: View, replicas: list) -> int:
    """The memory the view holds: a fresh one fed the same pages twice, under tracemalloc."""
    pages = []
    for service, stats, _ in replicas:
        after = None
        while True:
            page = json.dumps(stats.snapshot(after=after, limit=1000)).encode()
            pages.append((service, page))
            after = json.loads(page)["next"]
            if after is None:
                break
    decoded = [(service, json.loads(page)) for service, page in pages]
    before = tracemalloc.get_traced_memory()[0]
    fresh = View()
    for service, page in decoded:
        fresh.ingest(service, page)
    fresh.end_tick()
    del decoded, pages  # what the view keeps of them stays counted
    size = tracemalloc.get_traced_memory()[0] - before
    assert fresh.tenants
    return size


if __name__ == "__main__":
    main()
