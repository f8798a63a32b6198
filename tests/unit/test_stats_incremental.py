"""Incremental statistics readings: a replica answers only the tenants changed since a reading."""

from __future__ import annotations

import json

import pytest

from contracts.errors import InvalidRequest
from services.runtime.stats import KEPT_GENERATIONS, OTHER, OperationStats, ServiceStats, parse_stats_request

MS = 0.001


def _service(max_tenants: int = 10_000) -> tuple[ServiceStats, OperationStats]:
    stats = ServiceStats("router", replica_id="replica-1", max_tenants=max_tenants)
    return stats, stats.operation("request", "t.*.router.request", "router")


def _handle(operation: OperationStats, tenant: str) -> None:
    operation.finish(operation.start(tenant), MS)


def _since(stats: ServiceStats, reply: dict, **more) -> dict:
    """The ``since`` of a reading that follows ``reply`` (its generation, this replica's start)."""
    return {stats.replica_id: {"started": reply["started"], "generation": reply["generation"], **more}}


def _tenants(reply: dict) -> set[str]:
    return {name for endpoint in reply["endpoints"] for name in endpoint["tenants"]}


def _walk(stats: ServiceStats, since: dict, limit: int) -> tuple[list[list[str]], dict]:
    """Every page of one reading, following ``next`` with the first page's ``until``; the pages'
    tenant names and the first page."""
    first = reply = stats.snapshot(since=since, limit=limit)
    pages = [sorted(_tenants(reply))]
    follow = {
        stats.replica_id: {"started": first["started"], "generation": first["since"], "until": first["generation"]}
    }
    while reply["next"] is not None:
        reply = stats.snapshot(since=follow, after=reply["next"], limit=limit)
        assert reply["generation"] == first["generation"]
        pages.append(sorted(_tenants(reply)))
    return pages, first


def test_a_reading_after_another_holds_only_the_tenants_that_changed():
    stats, op = _service()
    for tenant in ("acme", "globex", "initech"):
        _handle(op, tenant)
    full = stats.snapshot(since={})
    assert _tenants(full) == {"acme", "globex", "initech"} and full["since"] is None
    _handle(op, "globex")
    reply = stats.snapshot(since=_since(stats, full))
    assert _tenants(reply) == {"globex"} and reply["since"] == full["generation"]
    assert reply["endpoints"][0]["tenants"]["globex"]["num_requests"] == 2
    assert reply["endpoints"][0]["num_requests"] == 4  # totals cover every tenant
    assert reply["generation"] > full["generation"]


def test_a_reading_with_nothing_changed_lists_no_tenant():
    stats, op = _service()
    _handle(op, "acme")
    full = stats.snapshot(since={})
    reply = stats.snapshot(since=_since(stats, full))
    assert _tenants(reply) == set() and reply["next"] is None


def test_a_message_in_flight_across_a_reading_is_read_again_when_it_finishes():
    stats, op = _service()
    record = op.start("acme")
    first = stats.snapshot(since={})
    assert first["endpoints"][0]["tenants"]["acme"]["in_flight"] == 1
    op.finish(record, MS)
    reply = stats.snapshot(since=_since(stats, first))
    assert reply["endpoints"][0]["tenants"]["acme"]["in_flight"] == 0
    assert reply["endpoints"][0]["tenants"]["acme"]["num_requests"] == 1


@pytest.mark.parametrize(
    "asked",
    [
        {},  # a replica the reader does not know yet
        {"replica-2": {"started": "x", "generation": 1}},  # another replica
        {"replica-1": {"started": "2020-01-01T00:00:00.000Z", "generation": 1}},  # an earlier start
    ],
)
def test_a_replica_the_reader_has_not_read_since_it_started_is_read_in_full(asked):
    stats, op = _service()
    for tenant in ("acme", "globex"):
        _handle(op, tenant)
    stats.snapshot(since={})
    reply = stats.snapshot(since=asked)
    assert _tenants(reply) == {"acme", "globex"} and reply["since"] is None


def test_a_reading_from_a_generation_no_longer_kept_is_in_full():
    stats, op = _service()
    _handle(op, "acme")
    old = stats.snapshot(since={})
    for _ in range(KEPT_GENERATIONS + 1):
        stats.snapshot(since={})  # other readers' readings close generations too
    _handle(op, "globex")
    reply = stats.snapshot(since=_since(stats, old))
    assert _tenants(reply) == {"acme", "globex"} and reply["since"] is None


def test_changes_read_by_another_reader_in_between_are_still_read():
    stats, op = _service()
    for tenant in ("acme", "globex", "initech"):
        _handle(op, tenant)
    mine = stats.snapshot(since={})
    _handle(op, "acme")
    stats.snapshot(since={})  # another monitor replica's reading closes a generation
    _handle(op, "globex")
    assert _tenants(stats.snapshot(since=_since(stats, mine))) == {"acme", "globex"}


def test_an_incremental_reading_is_paged_and_visits_each_changed_tenant_once():
    stats, op = _service()
    names = [f"tenant-{i:04d}" for i in range(3000)]
    for tenant in names:
        _handle(op, tenant)
    pages, full = _walk(stats, {}, limit=1000)
    assert [len(page) for page in pages] == [1000, 1000, 1000]
    changed = names[::5]  # 600 of them: more than a page
    for tenant in changed:
        _handle(op, tenant)
    pages, first = _walk(stats, _since(stats, full), limit=250)
    assert [len(page) for page in pages] == [250, 250, 100]
    assert [t for page in pages for t in page] == changed and first["since"] == full["generation"]


def test_a_change_during_a_walk_is_in_the_next_reading():
    stats, op = _service()
    names = [f"tenant-{i:04d}" for i in range(100)]
    for tenant in names:
        _handle(op, tenant)
    full = stats.snapshot(since={})
    for tenant in names[:50]:
        _handle(op, tenant)
    first = stats.snapshot(since=_since(stats, full), limit=20)
    _handle(op, "tenant-0000")  # before the cursor: this walk has passed it
    _handle(op, "tenant-0099")  # not in this walk's changes
    follow = {
        stats.replica_id: {"started": first["started"], "generation": first["since"], "until": first["generation"]}
    }
    second = stats.snapshot(since=follow, after=first["next"], limit=20)
    assert "tenant-0099" not in _tenants(second) and "tenant-0025" in _tenants(second)
    assert _tenants(stats.snapshot(since=_since(stats, first))) == {"tenant-0000", "tenant-0099"}


def test_gauges_name_their_tenants_in_every_reading_and_counters_when_they_change():
    stats, op = _service()
    driving = {"acme": 2}
    stats.gauge("runs_driven", read=lambda: driving)
    tokens = stats.counter("model_tokens", key="model")
    for tenant in ("acme", "globex", "initech"):
        _handle(op, tenant)
    full = stats.snapshot(since={})
    tokens.add("initech", 7, "gpt-mini")
    reply = stats.snapshot(since=_since(stats, full))
    gauge, counter = reply["figures"]
    assert gauge["tenants"] == {"acme": {"value": 2}}
    assert counter["tenants"] == {"initech": {"value": 7, "by": {"gpt-mini": 7}}}
    assert _tenants(reply) == {"acme", "initech"}  # acme only because a gauge names it


def test_a_tenant_past_the_cap_marks_other_as_changed():
    stats, op = _service(max_tenants=1)
    _handle(op, "acme")
    _handle(op, "globex")
    full = stats.snapshot(since={})
    _handle(op, "initech")
    assert _tenants(stats.snapshot(since=_since(stats, full))) == {OTHER}


def test_when_most_tenants_changed_a_reading_walks_every_name():
    stats, op = _service()
    names = [f"tenant-{i:04d}" for i in range(1000)]
    for tenant in names:
        _handle(op, tenant)
    full = stats.snapshot(since={})
    for tenant in names[:600]:
        _handle(op, tenant)
    pages, first = _walk(stats, _since(stats, full), limit=400)
    assert [t for page in pages for t in page] == names and first["since"] == full["generation"]


def test_a_reading_without_since_is_the_full_snapshot_as_before():
    stats, op = _service()
    _handle(op, "acme")
    stats.snapshot(since={})
    reply = stats.snapshot()
    assert _tenants(reply) == {"acme"} and "generation" not in reply and "since" not in reply


def test_since_is_read_from_the_request():
    body = {"since": {"replica-1": {"started": "2026-01-01T00:00:00.000Z", "generation": 4, "until": 6}}}
    assert parse_stats_request(json.dumps(body).encode())["since"] == body["since"]
    assert "since" not in parse_stats_request(b"{}")


@pytest.mark.parametrize(
    "since",
    [
        [],
        {"r": 1},
        {"r": {"generation": 1}},
        {"r": {"started": "x", "generation": "1"}},
        {"r": {"started": "x", "until": -1}},
    ],
)
def test_a_malformed_since_is_an_invalid_request(since):
    with pytest.raises(InvalidRequest, match="since"):
        parse_stats_request(json.dumps({"since": since}).encode())
