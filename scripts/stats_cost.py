"""What the per-tenant statistics cost: ``python scripts/stats_cost.py [--tenants N]``.

Fills one service's statistics with ``--tenants`` tenants on two operations, then times, with
``timeit`` (the best of five runs, since anything slower is noise from the machine): a
``start`` + ``finish`` pair of a known tenant (the cost added to every message), the same with an
error code, a refusal, and snapshots (totals only, one page, one page encoded to JSON, and every
page in turn), then incremental readings (``since``: only the tenants changed since the last
reading) with every tenant idle and with one in a hundred changed, encoded to JSON, against the
full walk. Compare the per-message figures with ``scripts/dispatch_cost.py``'s 25-75 µs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.runtime.stats import ServiceStats


def _best_ns(statement: str, namespace: dict[str, object], number: int) -> float:
    """Nanoseconds per run of ``statement``, the best of five batches of ``number``."""
    return min(timeit.repeat(statement, globals=namespace, number=number, repeat=5)) / number * 1e9


def main(tenants: int) -> None:
    stats = ServiceStats("router", replica_id="cost", max_tenants=tenants)
    requests = stats.operation("request", "t.*.router.request", "router")
    runs = stats.operation("run", "t.*.router.run", "router")
    names = [f"tenant-{i:05d}" for i in range(tenants)]
    for name in names:
        for operation in (requests, runs):
            operation.finish(operation.start(name), 0.002)
    known = names[len(names) // 2]
    namespace: dict[str, object] = {"op": requests, "tenant": known, "stats": stats, "json": json}

    pair = _best_ns("op.finish(op.start(tenant), 0.00042)", namespace, 200_000)
    failed = _best_ns("op.finish(op.start(tenant), 0.00042, 'tool_failed')", namespace, 200_000)
    refusal = _best_ns("op.refuse(tenant, 'forbidden')", namespace, 200_000)
    print(f"start + finish, known tenant      {pair:9.0f} ns")
    print(f"start + finish with an error code {failed:9.0f} ns")
    print(f"refuse, known tenant              {refusal:9.0f} ns")

    totals = _best_ns("stats.snapshot(detail=False)", namespace, 1000)
    page = _best_ns("stats.snapshot(limit=1000)", namespace, 20)
    encoded = _best_ns("json.dumps(stats.snapshot(limit=1000))", namespace, 20)
    sample = stats.snapshot(limit=1000)
    size = len(json.dumps(sample))
    entries = sum(len(endpoint["tenants"]) for endpoint in sample["endpoints"])

    def every_page() -> None:
        cursor = None
        while True:
            cursor = stats.snapshot(after=cursor, limit=1000)["next"]
            if cursor is None:
                return

    namespace["every_page"] = every_page
    walk = _best_ns("every_page()", namespace, 2)
    print(f"snapshot of {tenants} tenants x 2 operations:")
    print(f"  totals only (detail=False)        {totals / 1e3:9.1f} us")
    print(f"  one page, {entries} tenant entries    {page / 1e6:9.2f} ms")
    print(f"  the same + json.dumps ({size / 1024:.0f} KiB)  {encoded / 1e6:9.2f} ms")
    print(f"  every page in turn                {walk / 1e6:9.2f} ms")

    reply = stats.snapshot(since={})
    for label, changed in (("all idle", 0), ("1 in 100 changed", tenants // 100)):
        times = []
        for round_ in range(20):
            for name in names[round_ % 100 :: 100][:changed]:
                requests.finish(requests.start(name), 0.002)
            since = {"cost": {"started": reply["started"], "generation": reply["generation"]}}
            started = time.perf_counter()
            body = json.dumps(reply := stats.snapshot(since=since, limit=1000))
            times.append(time.perf_counter() - started)
            assert reply["next"] is None and reply["since"] is not None
        print(f"  incremental, {label:16} (+ json, {len(body) / 1024:.0f} KiB) {min(times) * 1e3:9.3f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=10_000, help="tenants per operation")
    main(parser.parse_args().tenants)
