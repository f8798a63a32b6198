"""The audit writer on a real JetStream: many tenants' entries in one round trip, each chain still
verifiable alone, replicas on the same chains re-chaining, tampering detected, and a stop that
returns under load. Tenants are unique per test (the session's broker is shared)."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from contracts import subjects
from contracts.audit import seal, seal_json
from corral.audit_reader import read_trail_on
from services.runtime import connection
from services.runtime.audit import AuditTrail
from tests.support.recording_log import Log


def tenants(count: int) -> list[str]:
    prefix = uuid.uuid4().hex[:8]
    return [f"t{prefix}-{n}" for n in range(count)]


@pytest.fixture
async def nc(nats_url):
    nc = await connection.connect(nats_url)
    yield nc
    await nc.close()


async def writer(nc) -> AuditTrail:
    trail = AuditTrail(nc, "tools", Log())
    await trail.start()
    return trail


async def test_many_tenants_records_in_one_window_take_one_round_trip_and_each_chain_verifies_alone(nc):
    names = tenants(300)
    trail = await writer(nc)
    try:
        for window in range(2):
            for name in names:
                trail.record(name, "tool_call", "ok", window=window)
                trail.record(name, "guard_refused", "refused", window=window)
            await trail.flushed(timeout=10)
    finally:
        await trail.stop()
    # The heads of the 300 new chains, read together; then one round of 300 appends per window.
    assert trail.stats["round_trips"] == 3 and trail.stats["entries"] == 600
    for name in names[:20]:
        report = await read_trail_on(nc, name)
        assert report.problems == []
        assert [len(entry.records) for _, entry in report.entries] == [2, 2]
        assert [record.detail["window"] for record in report.records] == [0, 0, 1, 1]


async def test_replicas_appending_to_the_same_chains_rechain_and_every_chain_stays_intact(nats_url, nc):
    other = await connection.connect(nats_url)
    names = tenants(50)
    first, second = await writer(nc), await writer(other)
    try:
        for n, trail in enumerate((first, second, first)):  # each time the other replica moved the heads
            for name in names:
                trail.record(name, "tool_call", "ok", n=n)
            await trail.flushed(timeout=10)
        for n in range(3, 6):  # and both at once
            for name in names:
                first.record(name, "tool_call", "ok", n=n, replica=1)
                second.record(name, "tool_call", "ok", n=n, replica=2)
            await asyncio.gather(first.flushed(timeout=10), second.flushed(timeout=10))
    finally:
        await first.stop()
        await second.stop()
        await other.close()
    assert first.stats["conflicts"] >= len(names)  # its third window found every head moved
    for name in names:
        report = await read_trail_on(nc, name)
        assert report.problems == []
        assert sorted((r.detail["n"], r.detail.get("replica", 0)) for r in report.records) == [
            (0, 0),
            (1, 0),
            (2, 0),
            *((n, replica) for n in range(3, 6) for replica in (1, 2)),
        ]


async def test_a_forged_altered_or_unreadable_entry_is_detected_in_its_chain_alone(nats_url, nc):
    forged_chain, altered_chain, garbage_chain, _intact = names = tenants(4)
    trail = await writer(nc)
    intruder = await nats.connect(nats_url)
    try:
        for name in names:
            trail.record(name, "tool_call", "ok", n=0)
        await trail.flushed(timeout=10)
        js = intruder.jetstream()
        # An entry that does not extend its chain, one whose records changed after it was
        # hashed, and one that is no entry at all.
        forged = seal(forged_chain, "0" * 64, []).model_dump_json().encode()
        await js.publish(subjects.audit(forged_chain, "tools"), forged)
        head = (await read_trail_on(nc, altered_chain)).entries[-1][1]
        _, body = seal_json(altered_chain, head.hash, [head.records[0].model_dump(mode="json")])
        await js.publish(
            subjects.audit(altered_chain, "tools"), body.replace(b'"outcome":"ok"', b'"outcome":"refused"')
        )
        await js.publish(subjects.audit(garbage_chain, "tools"), b"\xff not an entry")
        for name in names:  # the writer carries on after each of them
            trail.record(name, "tool_call", "ok", n=1)
        await trail.flushed(timeout=10)
    finally:
        await trail.stop()
        await intruder.close()
    reports = [await read_trail_on(nc, name) for name in names]
    assert [[p.problem for p in report.problems] for report in reports] == [
        ["chain broken: an entry before this one was removed or altered"],
        ["entry was altered (its hash does not match its content)"],
        ["unreadable entry"],
        [],
    ]
    assert [len(report.entries) for report in reports] == [3, 3, 3, 2]
    assert [len(report.records) for report in reports] == [2, 3, 2, 2]


async def test_stop_returns_within_its_timeout_while_thousands_of_tenants_records_are_written(nc):
    """Stopped mid-write (its cancellation lands on a wait for the broker), the writer ends. It
    used to lose the cancellation now and then (about one stop in four here) and park for ever."""
    for attempt in range(8):  # stopped at a different moment of the write each time
        trail = AuditTrail(nc, "tools", Log())
        await trail.start()
        for name in tenants(2000):
            trail.record(name, "tool_call", "ok")
        stopping = asyncio.create_task(trail.stop(timeout=0.01 + 0.03 * attempt))
        done, _ = await asyncio.wait({stopping}, timeout=5)
        assert done, "stop() did not return"
