"""Layer 2, reply subjects: a request whose reply subject is outside its tenant's inbox is not
answered there; the router tells the client on its run's events instead, and nowhere else."""

from __future__ import annotations

import asyncio
import json

import pytest

from contracts import subjects
from contracts.envelope import Kind, RouterRequest, new_envelope_json
from services.auth.tokens import mint_dev_token
from tests.security.conftest import tenant_connection, watched_connection

pytestmark = pytest.mark.usefixtures("system")


def request(run_id: str) -> bytes:
    return new_envelope_json(Kind.REQUEST, "acme", RouterRequest(input={"text": "where is my order?"}), run_id=run_id)


async def next_event(queue: asyncio.Queue, timeout: float = 10.0) -> dict:
    return json.loads((await asyncio.wait_for(queue.get(), timeout)).data)


async def test_a_client_without_the_inbox_prefix_hears_why_on_its_runs_events(system):
    broker, _ = system
    # nats-py's default inbox prefix, _INBOX.<random>: the mistake this is about.
    client = await watched_connection(broker.url, token=mint_dev_token("acme", key=broker.secrets.dev_key))
    events: asyncio.Queue = asyncio.Queue()
    try:
        await client.nc.subscribe(subjects.events("acme", "dev", "run-1"), cb=events.put)
        await client.nc.publish(subjects.router_request("acme", "dev"), request("run-1"), reply=client.nc.new_inbox())
        event = await next_event(events)
    finally:
        await client.nc.close()
    assert event["kind"] == "event" and event["run_id"] == "run-1"
    assert event["payload"]["type"] == "failed" and event["payload"]["service"] == "router"
    assert event["payload"]["data"]["code"] == "forbidden"
    assert "connect with inbox_prefix '_INBOX.acme'" in event["payload"]["data"]["message"]


async def test_a_reply_subject_in_another_tenants_inbox_is_reported_to_the_sender_and_reaches_nobody_else(system):
    broker, _ = system
    globex = await tenant_connection(broker, "globex")
    leaked: asyncio.Queue = asyncio.Queue()
    await globex.nc.subscribe("_INBOX.globex.>", cb=leaked.put)
    await globex.nc.subscribe("t.globex.events.>", cb=leaked.put)
    await globex.nc.flush()
    await globex.nc.flush()  # nats-py 2.16 may send a flush's PING ahead of the SUBs: twice is a barrier
    attacker = await tenant_connection(broker, "acme")
    events: asyncio.Queue = asyncio.Queue()
    try:
        await attacker.nc.subscribe("t.acme.events.>", cb=events.put)
        subject = subjects.router_request("acme", "dev")
        await attacker.nc.publish(subject, request("run-2"), reply="_INBOX.globex.stolen")
        event = await next_event(events)  # the router has handled it
        await globex.nc.flush()  # anything the router had sent globex would be here by now
    finally:
        await attacker.nc.close()
        await globex.nc.close()
    assert event["run_id"] == "run-2" and event["payload"]["data"]["code"] == "forbidden"
    assert leaked.empty()
    assert attacker.errors == []  # the sender itself did nothing its permissions refuse
