"""The monitor's arithmetic: counters into per-second deltas, rings, percentiles, top-K folding."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from services.monitor.metrics import registry_for
from services.monitor.settings import SERVICES
from services.monitor.view import View
from services.monitor.window import SLOTS, Ring, bucket_delta, counter_delta, dict_delta
from services.registry import NAMES
from services.runtime.stats import ServiceStats


def test_the_monitor_polls_every_registered_service():
    assert set(SERVICES) == set(NAMES)


def test_a_ring_keeps_the_last_minute_and_forgets_older_seconds():
    ring = Ring()
    ring.add(0, 5)
    ring.add(1, 2)
    assert ring.total(1) == 7 and ring.series(1)[-2:] == [5, 2]
    ring.add(SLOTS, 1)  # the slot of second 0 is reused: second 0 has left the window
    assert ring.total(SLOTS) == 3 and ring.total(SLOTS, seconds=1) == 1
    assert ring.total(SLOTS * 3) == 0 and len(ring.series(5)) == SLOTS


def test_a_counter_that_goes_down_is_a_restart():
    assert counter_delta(None, 4) == 4
    assert counter_delta(4, 9) == 5
    assert counter_delta(9, 2) == 2
    assert dict_delta({"x": 3}, {"x": 5, "y": 1}) == {"x": 2, "y": 1}
    assert dict_delta({"x": 3}, {"x": 1}) == {"x": 1}
    assert bucket_delta([1, 2, 0], [1, 5, 1], restarted=False) == [(1, 3), (2, 1)]


def replica(service: str = "router", replica_id: str = "r1") -> tuple[ServiceStats, object]:
    stats = ServiceStats(service, replica_id=replica_id)
    return stats, stats.operation("request", "t.*.router.request", service)


def handle(op, tenant: str, n: int, seconds: float = 0.002, error: str | None = None) -> None:
    for _ in range(n):
        op.finish(op.start(tenant), seconds, error=error)


def test_deltas_per_second_and_replicas_are_summed():
    view = View()
    one, op1 = replica(replica_id="r1")
    two, op2 = replica(replica_id="r2")
    handle(op1, "acme", 3)
    handle(op2, "acme", 2, error="tool_failed")
    view.ingest("router", one.snapshot())
    view.ingest("router", two.snapshot())
    view.end_tick()
    handle(op1, "acme", 1)
    view.ingest("router", one.snapshot())
    view.ingest("router", two.snapshot())
    view.end_tick()
    row = view.row("acme")
    assert row["messages"] == 6 and row["errors"] == 2 and row["rate"] == 0.6
    assert 1 < row["p50_ms"] < 3
    detail = view.detail("acme")
    assert detail["series"]["rate"][-2:] == [5, 1] and detail["errors_by_code"] == {"tool_failed": 2}
    (subject,) = view.subjects("acme")
    assert subject["family"] == "t.acme.router.request" and subject["messages"] == 6


def test_a_restarted_replica_counts_from_zero_again():
    view = View()
    old, op = replica(replica_id="r1")
    handle(op, "acme", 5)
    view.ingest("router", old.snapshot())
    view.end_tick()
    new, op = replica(replica_id="r1")  # same id for the sake of the test: counters went down
    handle(op, "acme", 2)
    view.ingest("router", new.snapshot())
    view.end_tick()
    assert view.row("acme")["messages"] == 7


def test_auth_errors_are_denials_not_messages():
    view = View()
    auth = ServiceStats("auth", replica_id="a1")
    callout = auth.operation("callout", "$SYS.REQ.USER.AUTH", "auth")
    handle(callout, "acme", 2)
    handle(callout, "acme", 1, error="unauthorized")
    view.ingest("auth", auth.snapshot())
    view.end_tick()
    row = view.row("acme")
    assert row["messages"] == 0 and row["denials"] == 1
    assert view.detail("acme")["denials_by_reason"] == {"unauthorized": 1}


def test_metrics_label_the_top_k_tenants_and_fold_the_rest_into_other():
    view = View()
    stats, op = replica()
    for i in range(10):
        handle(op, f"t{i}", i + 1)
    view.ingest("router", stats.snapshot())
    view.end_tick()
    text = __import__("prometheus_client").generate_latest(registry_for(view, top_k=3)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    messages = {s.labels["tenant"]: s.value for s in families["corral_messages"].samples}
    assert messages == {"t9": 10, "t8": 9, "t7": 8, "_other": sum(range(1, 8))}
    assert all(name.startswith("corral_") for name in families)
    full = __import__("prometheus_client").generate_latest(registry_for(view, full_tenants=True)).decode()
    assert 'tenant="t0"' in full and 'tenant="_other"' not in full
