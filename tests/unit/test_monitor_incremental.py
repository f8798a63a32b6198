"""The monitor's incremental readings: a tenant left out of a reply is unchanged, not forgotten."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from services.monitor.poller import StatsPoller
from services.monitor.view import REPLICA_TIMEOUT_S, View
from services.runtime.stats import OperationStats, ServiceStats, parse_stats_request

MS = 0.002


def _replica(replica_id: str) -> tuple[ServiceStats, OperationStats]:
    stats = ServiceStats("router", replica_id=replica_id)
    return stats, stats.operation("request", "t.*.router.request", "router")


def _handle(op: OperationStats, tenant: str, n: int = 1, error: str | None = None) -> None:
    for _ in range(n):
        op.finish(op.start(tenant), MS, error=error)


class _Bus:
    """Every replica of the router answering every request, as over the bus (through JSON); a
    ``legacy`` replica knows nothing of ``since``, as before incremental readings."""

    def __init__(self) -> None:
        self.replicas: list[tuple[ServiceStats, bool]] = []
        self.entries = 0  # tenant entries answered, over every reply

    def answer(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        replies = []
        for stats, legacy in self.replicas:
            request = parse_stats_request(json.dumps(body).encode())
            if legacy:
                request.pop("since", None)
            reply = json.loads(json.dumps(stats.snapshot(**request)))
            self.entries += sum(len(endpoint["tenants"]) for endpoint in reply["endpoints"])
            replies.append(reply)
        return replies


class _Poller(StatsPoller):
    def __init__(self, view: View, bus: _Bus) -> None:
        super().__init__(SimpleNamespace(_inbox_prefix=b"_INBOX"), view, ("router",), window_s=0.25, log=None)
        self.bus = bus

    async def _ask(self, service: str, body: dict[str, Any], expect: set[str] | None) -> list[dict[str, Any]]:
        return self.bus.answer(body)


async def _full_poll(view: View, bus: _Bus) -> None:
    """The reference: every replica read in full (as a monitor did before)."""
    for stats, _ in bus.replicas:
        after = None
        while True:
            reply = json.loads(json.dumps(stats.snapshot(after=after)))
            view.ingest("router", reply)
            if (after := reply["next"]) is None:
                break
    view.end_tick()


def _same(incremental: View, full: View, tenants: list[str]) -> None:
    assert incremental.rows() == full.rows()
    for tenant in tenants:
        assert incremental.detail(tenant)["series"] == full.detail(tenant)["series"]
        assert incremental.in_flight(tenant, "router", "request") == full.in_flight(tenant, "router", "request")


def test_a_tenant_missing_from_an_incremental_reply_is_unchanged():
    view = View()
    stats, op = _replica("r1")
    _handle(op, "acme", 3)
    _handle(op, "globex", 2)
    running = op.start("globex")  # in flight across the readings
    first = stats.snapshot(since={})
    view.ingest("router", first)
    view.end_tick()
    _handle(op, "acme", 1)
    since = {"r1": {"started": first["started"], "generation": first["generation"]}}
    reply = stats.snapshot(since=since)
    assert set(reply["endpoints"][0]["tenants"]) == {"acme"}
    view.ingest("router", reply)
    view.end_tick()
    assert view.detail("globex")["series"]["rate"][-2:] == [2, 0]
    assert view.detail("acme")["series"]["rate"][-2:] == [3, 1]
    assert view.in_flight("globex", "router", "request") == 1
    op.finish(running, MS)


async def test_rates_stay_exact_over_polls_mixing_changed_and_unchanged_tenants():
    bus = _Bus()
    (one, op1), (two, op2) = _replica("r1"), _replica("r2")
    bus.replicas = [(one, False), (two, False)]
    view, reference = View(), View()
    poller = _Poller(view, bus)
    tenants = [f"tenant-{i:04d}" for i in range(1200)]  # three pages of 500 in full
    for tenant in tenants:
        _handle(op1, tenant)
        _handle(op2, tenant)
    running = op1.start("tenant-0007")
    for second in range(6):
        if second:
            for i, tenant in enumerate(tenants[second::7]):  # a different seventh each second
                _handle(op1, tenant, 1 + i % 3, error="tool_failed" if i % 5 == 0 else None)
            _handle(op2, tenants[-second])
        if second == 3:
            op1.finish(running, MS)
        bus.entries = 0
        await poller.poll()
        await _full_poll(reference, bus)
        _same(view, reference, tenants[:20] + tenants[-6:])
        if second:
            # each replica answered only what changed (and the reference's full walk, 2400)
            assert bus.entries - 2 * len(tenants) < len(tenants) // 7 + 10


async def test_a_restarted_replica_and_a_replica_without_since_are_read_in_full():
    bus = _Bus()
    (one, op1), (old, op_old) = _replica("r1"), _replica("legacy")
    bus.replicas = [(one, False), (old, True)]
    view, reference = View(), View()
    poller = _Poller(view, bus)
    tenants = [f"tenant-{i:04d}" for i in range(700)]
    for tenant in tenants:
        _handle(op1, tenant, 2)
        _handle(op_old, tenant)
    for second in range(4):
        if second == 2:  # r1 restarts: a new process, a new id, counters from zero
            one, op1 = _replica("r1-restarted")
            bus.replicas[0] = (one, False)
            _handle(op1, "tenant-0001", 5)
        _handle(op_old, tenants[second])
        _handle(op1, tenants[-1 - second])
        await poller.poll()
        await _full_poll(reference, bus)
        _same(view, reference, tenants[:5] + tenants[-5:])


async def test_a_replica_the_view_forgot_is_read_in_full_again():
    bus = _Bus()
    stats, op = _replica("r1")
    bus.replicas = [(stats, False)]
    view = View()
    poller = _Poller(view, bus)
    _handle(op, "acme", 4)
    await poller.poll()
    bus.replicas = []  # silent: forgotten after REPLICA_TIMEOUT_S
    for _ in range(REPLICA_TIMEOUT_S + 1):
        await poller.poll()
    assert not view.remembers("r1")
    bus.replicas = [(stats, False)]
    bus.entries = 0
    await poller.poll()
    assert bus.entries == 1  # acme again, though it did not change
