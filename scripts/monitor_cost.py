"""What the monitor costs with many tenants: one poll's ingest, one scrape, and its memory.

    python scripts/monitor_cost.py [--tenants 10000] [--ticks 5]

Synthetic statistics: router, graph and tools replicas (one each) where every tenant sends a
message every second (the worst case: nothing idle), read as the poller reads them (every page,
through JSON), fed to the view; then the Prometheus exposition with the default top-K and with
every tenant labelled, and the JSON API's answers. Memory: tracemalloc of the view alone.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

from prometheus_client import generate_latest

from services.monitor.metrics import registry_for
from services.monitor.view import View
from services.runtime.stats import ServiceStats

OPERATIONS = (
    ("router", "request", "t.*.router.request.>"),
    ("graph", "run", "t.*.graph.run"),
    ("tools", "call", "t.*.tools.call"),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--ticks", type=int, default=5)
    args = parser.parse_args()
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
