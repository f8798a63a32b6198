"""The audit writer: one round trip per window for every tenant's chain, records retried until
written, in order, a tenant whose appends keep failing not holding up the others, conflicts with
another replica re-chained, and a stop that returns. JetStream is a fake here; the real stream is
tests/integration/test_audit_batching.py and tests/security/test_audit_trail.py."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from contracts.audit import AuditEntry, seal_json, verify_chain
from services.runtime import audit
from services.runtime.audit import AuditTrail
from services.runtime.retry import RetryPolicy
from tests.support.recording_log import Log


class FakeJetStream:
    """The writer's broker side (``audit.Chains``) in memory, with the stream's per-subject check
    (``Nats-Expected-Last-Subject-Sequence``). Refuses appends for ``failing`` tenants (``times``
    times, or for ever), stores the rest; ``appends`` holds the size of each round sent."""

    max_payload = 1024 * 1024

    def __init__(self, failing: set[str] = frozenset(), times: int | None = None) -> None:
        self.failing = failing
        self.times = times
        self.refused = 0
        self.stored: list[tuple[str, AuditEntry]] = []
        self.last: dict[str, tuple[int, str]] = {}  # subject -> (sequence, hash) of its last entry
        self.appends: list[int] = []

    async def start(self):
        return None

    async def stop(self):
        return None

    async def heads(self, chain_subjects):
        return [self.last.get(subject, (0, "")) for subject in chain_subjects]

    async def append(self, appends):
        self.appends.append(len(appends))
        for entry in appends:
            tenant = entry.subject.split(".")[1]
            if tenant in self.failing and (self.times is None or self.refused < self.times):
                self.refused += 1
                entry.error = TimeoutError("broker away")
            elif self.last.get(entry.subject, (0, ""))[0] != entry.expected:
                entry.error = audit.ChainConflict("wrong last sequence")
            else:
                entry.seq = self.store(entry.subject, entry.body)

    def store(self, subject: str, body: bytes) -> int:
        """What any writer's accepted append does (tests call it as another replica)."""
        entry = AuditEntry.model_validate_json(body)
        self.stored.append((entry.tenant_id, entry))
        self.last[subject] = (len(self.stored), entry.hash)
        return len(self.stored)


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch):
    # The writer's real pauses start at 0.5 s; here they are nothing, so the tests never wait on time.
    monkeypatch.setattr(audit, "APPEND_RETRY", RetryPolicy(initial_interval_s=0, max_interval_s=0, max_attempts=None))


async def writer(js: FakeJetStream) -> tuple[AuditTrail, Log]:
    log = Log()
    trail = AuditTrail(None, "tools", log, chains=js)
    await trail.start()
    return trail, log


def chain_of(js: FakeJetStream, tenant: str) -> list[tuple[int, AuditEntry]]:
    """A tenant's chain as stored: (stream sequence, entry)."""
    return [(n, entry) for n, (owner, entry) in enumerate(js.stored, 1) if owner == tenant]


def trail_record(action: str) -> dict:
    return {
        "at": "2026-12-01T00:00:00+00:00",
        "service": "tools",
        "action": action,
        "outcome": "ok",
        "principal": None,
        "run_id": None,
        "detail": {},
    }


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


async def test_many_tenants_records_in_one_window_are_sent_in_one_round_and_each_chain_verifies_alone():
    js = FakeJetStream()
    trail, _ = await writer(js)
    tenants = [f"tenant-{n:04d}" for n in range(2000)]
    for window in range(2):
        for tenant in tenants:
            trail.record(tenant, "tool_call", "ok", window=window)
        await trail.flushed(timeout=5)
    await trail.stop()
    assert js.appends == [2000, 2000]  # one round per window, every tenant's entry in it
    assert trail.stats["round_trips"] == 3  # the heads once (all together), then one per window
    for tenant in tenants:
        chain = chain_of(js, tenant)
        assert verify_chain(tenant, chain) == []
        assert [record.detail["window"] for _, entry in chain for record in entry.records] == [0, 1]


async def test_a_chain_with_more_records_than_an_entry_holds_is_written_in_order_over_rounds():
    js = FakeJetStream()
    trail, _ = await writer(js)
    for n in range(2 * audit.MAX_RECORDS_PER_ENTRY + 1):
        trail.record("acme", "tool_call", "ok", n=n)
    await trail.flushed(timeout=5)
    await trail.stop()
    chain = chain_of(js, "acme")
    assert [len(entry.records) for _, entry in chain] == [audit.MAX_RECORDS_PER_ENTRY] * 2 + [1]
    assert [record.detail["n"] for _, entry in chain for record in entry.records] == list(range(1001))
    assert verify_chain("acme", chain) == []


async def test_a_chain_another_replica_extended_is_rechained_on_its_new_head_without_holding_up_others():
    js = FakeJetStream()
    trail, _ = await writer(js)
    trail.record("acme", "tool_call", "ok", n=0)
    await trail.flushed(timeout=5)
    # Another replica appends to acme's chain meanwhile: this writer's head for it is stale.
    _, head = js.last["t.acme.audit.tools"]
    js.store("t.acme.audit.tools", seal_json("acme", head, [trail_record("other replica")])[1])
    trail.record("acme", "tool_call", "ok", n=1)
    trail.record("globex", "tool_call", "ok", n=1)
    await trail.flushed(timeout=5)
    await trail.stop()
    assert js.appends == [1, 2, 1]  # acme and globex together; then acme alone, re-chained
    assert trail.stats["conflicts"] == 1
    chain = chain_of(js, "acme")
    assert verify_chain("acme", chain) == []
    assert [record.detail.get("n") for _, entry in chain for record in entry.records] == [0, None, 1]


async def test_an_entry_whose_acknowledgement_was_lost_is_not_written_twice():
    class LosesOneAck(FakeJetStream):
        async def append(self, appends):
            await super().append(appends)
            if len(self.appends) == 1:  # stored, but the acknowledgement never came back
                appends[0].seq, appends[0].error = None, audit.AckLost("no acknowledgement")

    js = LosesOneAck()
    trail, log = await writer(js)
    trail.record("acme", "tool_call", "ok", n=0)
    await trail.flushed(timeout=5)
    await trail.stop()
    assert [event for event, _ in log.lines] == ["audit_append_failed"]
    assert [[record.detail["n"] for record in entry.records] for _, entry in js.stored] == [[0]]
    assert js.appends == [1]  # found at the chain's head when it was read again: not sent again


async def test_stop_returns_when_the_writer_loses_its_cancellation():
    class LosesOneCancellation(FakeJetStream):
        """Waits for acknowledgements that never come and loses the first cancellation, as
        Python 3.11's asyncio.wait_for does when one arrives with the reply it awaited."""

        async def append(self, appends):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
            await asyncio.Event().wait()

    trail, log = await writer(LosesOneCancellation())
    trail.record("acme", "tool_call", "ok")
    stopping = asyncio.create_task(trail.stop(timeout=0.05))
    done, _ = await asyncio.wait({stopping}, timeout=3)
    assert done, "stop() did not return: the writer's lost cancellation was never repeated"
    assert ("audit_records_unwritten", {"tenants": ["acme"]}) in log.lines


async def test_flushed_returns_when_the_pass_in_flight_wrote_everything():
    class Held(FakeJetStream):
        def __init__(self) -> None:
            super().__init__()
            self.sending, self.release = asyncio.Event(), asyncio.Event()

        async def append(self, appends):
            self.sending.set()
            await self.release.wait()
            await super().append(appends)

    js = Held()
    trail, _ = await writer(js)
    trail.record("acme", "tool_call", "ok")
    await js.sending.wait()  # a pass is writing the only record
    flushing = asyncio.create_task(trail.flushed(timeout=5))
    await asyncio.sleep(0)
    js.release.set()
    done, _ = await asyncio.wait({flushing}, timeout=2)
    await trail.stop()
    assert done and flushing.exception() is None
