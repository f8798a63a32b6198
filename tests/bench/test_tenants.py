"""``corral bench --tenants N`` on a system of its own, with tiny counts: every figure is there and
positive; the generated definitions are valid ones."""

from __future__ import annotations

from corral.bench.tenants import DEFINITIONS_FILE, SIDES, run_tenants_bench, table, write_tenant_definitions
from corral.state import copy_demo_definitions
from services.runtime.catalog import load_catalog


def test_the_generated_tenants_are_the_demo_acme_s_routes_and_tools_unthrottled(tmp_path):
    folder = tmp_path / "definitions"
    copy_demo_definitions(folder)
    names = write_tenant_definitions(folder, 3, first_connections=65)
    catalog = load_catalog([folder])
    acme = catalog.tenants["acme"]
    assert names == ["t00000", "t00001", "t00002"] and (folder / DEFINITIONS_FILE).is_file()
    for name in names:
        policy = catalog.tenants[name]
        assert policy.routes == acme.routes and policy.tools == acme.tools
        assert policy.rate_limit.per_second >= 1_000_000
    assert catalog.tenants["t00000"].connection.max_connections == 65


async def test_the_benchmark_reports_every_figure():
    report = await run_tenants_bench(tenants=12, requests=40, concurrency=4, rounds=1, quiet=True)
    for part in ("", "_unmonitored"):
        for side in SIDES:
            assert report[f"{side}_rps{part}"] > 0, (side, part)
        assert report[f"tenant_ratio{part}"] > 0 and report[f"tenant_ratio_same_connections{part}"] > 0
        for side in SIDES:  # where each request's CPU went: every hop of the path spent some
            spent = report["cpu_us_per_request"][f"{side}{part}"]
            assert {"router0", "graph0", "tools0", "broker", "client"} <= spent.keys(), (side, part, spent)
    assert report["tenants"] == 12 and report["connect_total_s"] >= report["connect_slowest_s"] >= 0
    assert report["broker_mem_after_bytes"] > 0 and report["startup_s"] > 0
    assert "12 tenants, one connection each" in table(report) and "CPU per request" in table(report)
