"""The audit writer under failing appends: records are retried until written, in order, and a
tenant whose appends keep failing does not hold up the others. JetStream is a fake here; the
real chain under concurrent writers is tests/security/test_audit_trail.py."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from nats.js.errors import NotFoundError

from contracts.audit import AuditEntry
from services.runtime import audit
from services.runtime.audit import AuditTrail
from services.runtime.retry import RetryPolicy


class FakeJetStream:
    """Refuses appends for ``failing`` tenants (``times`` times, or for ever), stores the rest."""

    def __init__(self, failing: set[str], times: int | None = None) -> None:
        self.failing = failing
        self.times = times
        self.refused = 0
        self.stored: list[tuple[str, AuditEntry]] = []

    async def add_stream(self, config):
        return None

    async def get_last_msg(self, stream, subject, direct=False):
        raise NotFoundError

    async def publish(self, subject, body, headers=None, timeout=None):
        tenant = subject.split(".")[1]
        if tenant in self.failing and (self.times is None or self.refused < self.times):
            self.refused += 1
            raise TimeoutError("broker away")
        self.stored.append((tenant, AuditEntry.model_validate_json(body)))
        return SimpleNamespace(seq=len(self.stored))


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def warning(self, event, **fields):
        self.lines.append((event, fields))

    error = warning


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch):
    # The writer's real pauses start at 0.5 s; here they are nothing, so the tests never wait on time.
    monkeypatch.setattr(audit, "APPEND_RETRY", RetryPolicy(initial_interval_s=0, max_interval_s=0, max_attempts=None))


async def writer(js: FakeJetStream) -> tuple[AuditTrail, Log]:
    log = Log()
    trail = AuditTrail(SimpleNamespace(jetstream=lambda: js), "tools", log)
    await trail.start()
    return trail, log


async def test_a_failed_append_is_retried_until_written_with_the_records_in_order():
    js = FakeJetStream(failing={"acme"}, times=3)
    trail, log = await writer(js)
    for n in range(3):
        trail.record("acme", "tool_call", "ok", n=n)
    await trail.flushed(timeout=5)
    await trail.stop()
    assert [[record.detail["n"] for record in entry.records] for _, entry in js.stored] == [[0, 1, 2]]
    assert [event for event, _ in log.lines] == ["audit_append_failed"] * 3


async def test_a_tenant_whose_appends_keep_failing_does_not_hold_up_the_others_nor_lose_its_records():
    js = FakeJetStream(failing={"acme"})
    trail, log = await writer(js)
    trail.record("acme", "tool_call", "ok")
    trail.record("globex", "tool_call", "ok")
    deadline = time.monotonic() + 5
    while not js.stored and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert [tenant for tenant, _ in js.stored] == ["globex"]
    await trail.stop(timeout=0.05)
    assert ("audit_records_unwritten", {"tenants": ["acme"]}) in log.lines
