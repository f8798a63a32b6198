"""Refusals are counted per tenant and kind per window: one log line and one audit record each
(services/runtime/refusals.py)."""

from __future__ import annotations

from structlog.testing import LogCapture

from services.runtime.refusals import Refusals


class Trail:
    def __init__(self):
        self.records = []

    def record(self, tenant, action, outcome, **detail):
        self.records.append((tenant, action, outcome, detail))


def refusals():
    import structlog

    captured = LogCapture()
    # Its own level filter: the process-wide one is whatever another test configured last.
    log = structlog.wrap_logger(
        structlog.PrintLogger(), processors=[captured], wrapper_class=structlog.make_filtering_bound_logger(0)
    )
    trail = Trail()
    return Refusals(log, trail, window_s=3600), captured, trail


async def test_a_flood_of_refusals_is_one_log_line_then_one_summary_per_kind():
    counter, log, _ = refusals()
    for _ in range(1000):
        counter.add("acme", "tenant_mismatch", "envelope tenant does not match", "t.acme.router.request")
    assert [entry["event"] for entry in log.entries] == ["refused"]  # the first, in full
    counter.close_window()
    summary = log.entries[-1]
    assert summary["event"] == "refusals" and summary["count"] == 1000 and summary["tenants"] == 1


async def test_attempts_on_the_isolation_layers_become_one_audit_record_per_tenant_and_kind():
    counter, _, trail = refusals()
    for tenant, n in (("acme", 412), ("globex", 3)):
        for _ in range(n):
            counter.add(tenant, "tenant_mismatch", "mismatch", "t.x.router.request", principal="p")
    counter.add("acme", "invalid_request", "bad envelope", "t.acme.router.request")  # not audited
    counter.close_window()
    assert sorted((t, d["code"], d["count"]) for t, _, _, d in trail.records) == [
        ("acme", "tenant_mismatch", 412),
        ("globex", "tenant_mismatch", 3),
    ]
    assert all(action == "guard_refused" and outcome == "refused" for _, action, outcome, _ in trail.records)


async def test_a_refusal_already_recorded_elsewhere_is_counted_but_not_audited_again():
    counter, _, trail = refusals()
    counter.add("acme", "forbidden", "not allowed", "t.acme.tool.x.call", audit=False)
    counter.close_window()
    assert trail.records == []


async def test_a_refusal_without_a_readable_tenant_is_logged_never_audited():
    counter, log, trail = refusals()
    counter.add(None, "forbidden", "not a tenant subject", "x")
    counter.close_window()
    assert trail.records == [] and log.entries[0]["event"] == "refused"


async def test_the_window_closes_by_itself():
    import asyncio

    import structlog

    trail = Trail()
    counter = Refusals(structlog.get_logger(), trail, window_s=0.01)
    counter.add("acme", "tenant_mismatch", "x", "t.acme.router.request")
    for _ in range(500):  # polling with a bound: the window's timer fires on the loop
        if trail.records:
            break
        await asyncio.sleep(0.01)
    assert trail.records and trail.records[0][3]["count"] == 1
