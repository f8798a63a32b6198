"""The census of a bucket's live keys (services/runtime/census.py) and the shared gauges it feeds:
counts per tenant and state, finished and deleted keys dropped, idle keys pruned by age, and the
monitor taking a shared gauge from one replica (the furthest) instead of summing the replicas."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.monitor.metrics import registry_for
from services.monitor.view import View
from services.runtime.census import Census, Tally
from services.runtime.stats import OTHER, ServiceStats
from services.workflow.driver import open_state


def line(status: str) -> bytes:
    return json.dumps({"run_id": "r", "status": status}).encode()


def entry(key: str, value: bytes, revision: int, operation: str | None = None, created=None):
    return SimpleNamespace(key=key, value=value, revision=revision, operation=operation, created=created)


def test_open_runs_are_counted_per_tenant_and_state_and_finished_ones_dropped():
    census = Census("WORKFLOW_RUNS", open_state)
    tally = census.tally
    for key, status, revision in [
        ("acme.r1", "running", 1),
        ("acme.r2", "waiting", 2),
        ("acme.r3", "sleeping", 3),
        ("globex.r4", "waiting", 4),
        ("acme.r1", "compensating", 5),  # still being driven: running
    ]:
        census._apply(tally, entry(key, line(status), revision))
    assert census.counts() == {"acme": {"running": 1, "waiting": 1, "sleeping": 1}, "globex": {"waiting": 1}}
    census._apply(tally, entry("acme.r2", line("completed"), 6))
    census._apply(tally, entry("acme.r3", b"", 7, operation="DEL"))
    census._apply(tally, entry("globex.r4", line("cancelled"), 8))
    assert census.counts() == {"acme": {"running": 1}}
    assert len(tally) == 1 and census.revision == 8  # only what is open is kept


@pytest.mark.parametrize(
    "value",
    [b"not json", b"[]", b'{"status": 7}', b'{"status": "exploded"}', b"\xff\xfe", b"{" * 10_000, b""],
)
def test_a_line_the_census_cannot_read_is_not_counted(value):
    census = Census("WORKFLOW_RUNS", open_state)
    census._apply(census.tally, entry("acme.r1", value, 1))
    assert census.counts() == {} and census.revision == 1


def test_a_key_without_a_tenant_is_not_counted_and_a_classifier_that_raises_counts_nothing():
    census = Census("B", lambda value: 1 / 0)  # type: ignore[arg-type, return-value]
    census._apply(census.tally, entry("acme.x", b"{}", 1))
    tally = Tally()
    tally.put("_other.x", "running", 0.0)
    tally.put("Not A Tenant.x", "running", 0.0)
    assert census.counts() == {} and tally.counts() == {}


def test_idle_keys_count_while_written_within_the_age_limit_then_are_pruned():
    tally = Tally(ttl_s=60)
    tally.put("acme.s1", "active", 1000.0)
    tally.put("acme.s2", "active", 1010.0)
    tally.put("globex.s3", "active", 1020.0)
    tally.put("acme.s1", "active", 1030.0)  # spoken in again: younger now
    assert tally.counts(now=1065.0) == {"acme": {"active": 2}, "globex": {"active": 1}}
    assert tally.counts(now=1075.0) == {"acme": {"active": 1}, "globex": {"active": 1}}  # s2 aged out
    assert tally.counts(now=1200.0) == {} and len(tally) == 0


def _metrics(view: View) -> dict:
    text = generate_latest(registry_for(view)).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_a_keyed_shared_gauge_is_reported_with_its_revision():
    stats = ServiceStats("workflow", replica_id="w1", max_tenants=1)
    counts = {"acme": {"waiting": 2, "sleeping": 1}, "globex": {"waiting": 1}}
    stats.gauge("workflow_runs_open", read=lambda: counts, key="state", shared=True, revision=lambda: 41)
    (figure,) = stats.snapshot()["figures"]
    assert figure["kind"] == "shared_gauge" and figure["key"] == "state" and figure["revision"] == 41
    assert figure["value"] == 4 and figure["by"] == {"waiting": 3, "sleeping": 1}
    assert figure["tenants"]["acme"] == {"value": 3, "by": {"waiting": 2, "sleeping": 1}}
    assert figure["tenants"][OTHER] == {"value": 1, "by": {"waiting": 1}}  # past the cap of 1
    with pytest.raises(ValueError):
        stats.gauge("swarm_sessions_active", read=dict, shared=True)  # no revision: which replica is ahead?


def _replica(replica: str, revision: int, counts: dict) -> ServiceStats:
    stats = ServiceStats("workflow", replica_id=replica)
    stats.gauge("workflow_runs_open", read=lambda: counts, key="state", shared=True, revision=lambda: revision)
    return stats


def test_the_monitor_takes_a_shared_gauge_from_the_furthest_replica_not_the_sum():
    view = View()
    behind = _replica("w1", 10, {"acme": {"waiting": 2}})  # has not seen the run finish yet
    ahead = _replica("w2", 11, {"acme": {"waiting": 1}, "globex": {"sleeping": 1}})
    for stats in (behind, ahead):
        view.ingest("workflow", stats.snapshot())
    view.end_tick()
    patterns = view.detail("acme")["patterns"]
    assert patterns["workflow_runs_open"] == {"running": 0, "waiting": 1, "sleeping": 0}
    assert view.detail("globex")["patterns"]["workflow_runs_open"]["sleeping"] == 1
    family = _metrics(view)["corral_workflow_runs_open"]
    samples = {(s.labels["tenant"], s.labels["state"]): s.value for s in family.samples}
    assert samples == {("acme", "waiting"): 1, ("globex", "sleeping"): 1}


def test_replicas_in_step_give_the_figure_once():
    view = View()
    for replica in ("w1", "w2", "w3"):
        view.ingest("workflow", _replica(replica, 5, {"acme": {"sleeping": 2}}).snapshot())
    view.end_tick()
    assert view.detail("acme")["patterns"]["workflow_runs_open"]["sleeping"] == 2


def test_swarm_sessions_active_is_a_shared_gauge_of_the_patterns():
    view = View()
    for replica in ("s1", "s2"):
        stats = ServiceStats("swarm", replica_id=replica)
        stats.gauge("swarm_sessions_active", read=lambda: {"acme": 3}, shared=True, revision=lambda: 9)
        view.ingest("swarm", stats.snapshot())
    view.end_tick()
    assert view.detail("acme")["patterns"]["swarm_sessions_active"] == 3
    (sample,) = _metrics(view)["corral_swarm_sessions_active"].samples
    assert sample.labels == {"tenant": "acme"} and sample.value == 3


def test_a_malformed_shared_gauge_never_breaks_the_view():
    view = View()
    snapshot = _replica("w1", 1, {"acme": {"waiting": 1}}).snapshot()
    snapshot["figures"][0]["revision"] = "soon"
    view.ingest("workflow", snapshot)
    view.end_tick()
    assert view.detail("acme")["patterns"]["workflow_runs_open"]["waiting"] == 1
