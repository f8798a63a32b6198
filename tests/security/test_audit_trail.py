"""The audit trail: tool calls, guard refusals and tenant-override attempts are recorded in a
per-tenant hash chain that stays intact under concurrent writers and exposes tampering."""

from __future__ import annotations

import asyncio
import time

import jwt
import nats
import pytest

from contracts import subjects
from contracts.audit import STREAM, seal
from contracts.envelope import Envelope, Kind, RouterRequest, ToolCall, deadline_in
from contracts.errors import Forbidden
from contracts.replies import decode_reply
from corral.audit_reader import read_trail
from tests.security.conftest import still_serving, tenant_connection, watched_connection


async def trail(broker, tenant):
    return await read_trail(broker.url, "admin", broker.secrets.passwords["admin"], tenant)


async def flushed(services):
    for service in services.values():
        await service.flushed()


async def test_tool_calls_and_refusals_are_recorded_per_tenant(system):
    broker, services = system
    await still_serving(broker, "acme")
    await still_serving(broker, "globex")
    acme = await tenant_connection(broker, "acme")
    forged = Envelope[RouterRequest](kind=Kind.REQUEST, tenant_id="globex", payload=RouterRequest())
    try:
        await acme.nc.request(subjects.router_request("acme", "dev"), forged.model_dump_json().encode(), timeout=5)
    finally:
        await acme.nc.close()
    await flushed(services)
    acme_trail, globex_trail = await trail(broker, "acme"), await trail(broker, "globex")
    actions = [(r.service, r.action, r.outcome) for r in acme_trail.records]
    assert ("tools", "tool_call", "ok") in actions
    assert ("router", "guard_refused", "refused") in actions
    refusal = next(r for r in acme_trail.records if r.action == "guard_refused")
    assert refusal.detail["code"] == "tenant_mismatch"
    call = next(r for r in acme_trail.records if r.action == "tool_call")
    assert call.detail["tool"] == "orders_lookup" and call.detail["arguments"] == ["query"]
    assert "where is my order" not in str(acme_trail.records)  # argument values are never recorded
    assert [r.action for r in globex_trail.records] == ["tool_call"]
    assert acme_trail.problems == [] and globex_trail.problems == []


async def test_a_tenant_id_smuggled_into_tool_arguments_is_removed_and_recorded(system):
    broker, services = system
    # A compromised or confused executor calls a tool with another tenant's id in the arguments.
    graph = await nats.connect(
        broker.url, user="graph", password=broker.secrets.passwords["graph"], inbox_prefix=b"_INBOX._graph"
    )
    call = Envelope[ToolCall](
        kind=Kind.TOOL_CALL,
        tenant_id="acme",
        deadline=deadline_in(10),
        payload=ToolCall(tool="orders_lookup", arguments={"query": "G-2201", "tenant_id": "globex"}),
    )
    try:
        reply = await graph.request(
            subjects.tool_call("acme", "orders_lookup"), call.model_dump_json().encode(), timeout=5
        )
    finally:
        await graph.close()
    output = decode_reply(reply.data)
    assert output["found"] is False  # globex's order G-2201 is not visible to acme
    await flushed(services)
    attempts = [r for r in (await trail(broker, "acme")).records if r.action == "tenant_override_attempt"]
    assert attempts and attempts[0].detail["removed"] == ["tenant_id"]


async def test_the_chain_stays_intact_under_concurrent_writers(system):
    broker, services = system
    from corral.client import CorralClient
    from services.auth.tokens import mint_dev_token

    client = await CorralClient.connect(
        broker.url, tenant="acme", token=mint_dev_token("acme", key=broker.secrets.dev_key)
    )
    acme = await tenant_connection(broker, "acme")
    forged = Envelope[RouterRequest](kind=Kind.REQUEST, tenant_id="globex", payload=RouterRequest())
    try:
        # Router (refusals) and tools (calls) append to acme's chain at the same time.
        await asyncio.gather(
            *[client.request("where is my order?", watch=False) for _ in range(40)],
            *[
                acme.nc.request(subjects.router_request("acme", "dev"), forged.model_dump_json().encode(), timeout=5)
                for _ in range(40)
            ],
        )
    finally:
        await client.close()
        await acme.nc.close()
    await flushed(services)
    report = await trail(broker, "acme")
    assert report.problems == []
    assert sum(r.action == "tool_call" for r in report.records) == 40
    # Refusals are aggregated per tenant and kind over one-second windows.
    assert sum(r.detail["count"] for r in report.records if r.action == "guard_refused") == 40


async def test_audit_records_cannot_be_deleted_and_forged_entries_are_detected(system):
    broker, services = system
    await still_serving(broker)
    await flushed(services)
    tools = await watched_connection(
        broker.url, user="tools", password=broker.secrets.passwords["tools"], inbox_prefix=b"_INBOX._tools"
    )
    nc = tools.nc
    js = nc.jetstream()
    try:
        first = (await trail(broker, "acme")).entries[0][0]
        # A service may not even ask to delete (and the stream itself refuses anyone, below).
        await nc.publish(f"$JS.API.STREAM.MSG.DELETE.{STREAM}", f'{{"seq": {first}}}'.encode(), reply=nc.new_inbox())
        assert "permissions violation for publish" in await tools.violation()
        # A compromised writer appends an entry that does not extend the chain.
        fake = seal("acme", "0" * 64, [])
        await js.publish(subjects.audit("acme", "tools"), fake.model_dump_json().encode())
    finally:
        await nc.close()
    report = await trail(broker, "acme")
    assert report.problems and "chain broken" in report.problems[-1].problem
    admin = await nats.connect(
        broker.url, user="admin", password=broker.secrets.passwords["admin"], inbox_prefix=b"_INBOX._admin"
    )
    try:
        config = (await admin.jetstream().stream_info(STREAM)).config
    finally:
        await admin.close()
    assert config.deny_delete and config.deny_purge


async def test_refused_tokens_signed_by_a_trusted_key_reach_their_tenants_trail(system):
    broker, _ = system
    now = int(time.time())
    expired = jwt.encode(
        {"iss": "corral-dev", "aud": "corral", "sub": "bob", "tenant_id": "globex", "iat": now - 600, "exp": now - 300},
        broker.secrets.dev_key,
        algorithm="HS256",
    )
    forged = jwt.encode(
        {"iss": "corral-dev", "aud": "corral", "sub": "eve", "tenant_id": "globex", "iat": now, "exp": now + 300},
        "a-key-nobody-trusts-0123456789abcdef",
        algorithm="HS256",
    )
    for token in (expired, forged):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(broker.url, token=token, allow_reconnect=False, connect_timeout=3)
    records = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # written in the background: poll with a deadline
        records = [r for r in (await trail(broker, "globex")).records if r.action == "auth_denied"]
        if records:
            break
        await asyncio.sleep(0.05)
    # Only the expired token was signed by a trusted key: the forged one's claim is not believed.
    assert [(r.service, r.detail["reason"]) for r in records] == [("auth", "token expired")]


async def test_audit_records_name_the_verified_principal_never_the_one_an_envelope_claims(system):
    """The principal comes from the broker-verified identity (the subject names it); an envelope
    claiming another is refused, and the record keeps both."""
    from corral.client import CorralClient
    from services.auth.tokens import mint_dev_token

    broker, services = system
    token = mint_dev_token("acme", key=broker.secrets.dev_key, sub="alice")
    client = await CorralClient.connect(broker.url, tenant="acme", token=token)
    forger = await nats.connect(broker.url, token=token, inbox_prefix=subjects.inbox_prefix("acme").encode())
    claimed = Envelope[RouterRequest](kind=Kind.REQUEST, tenant_id="acme", principal="ceo", payload=RouterRequest())
    try:
        await client.request("where is my order?", watch=False)
        reply = await forger.request(
            subjects.router_request("acme", "alice"), claimed.model_dump_json().encode(), timeout=5
        )
    finally:
        await client.close()
        await forger.close()
    with pytest.raises(Forbidden, match="names principal 'ceo'"):
        decode_reply(reply.data)
    await flushed(services)
    records = (await trail(broker, "acme")).records
    calls = [r for r in records if r.action == "tool_call"]
    assert calls and all(r.principal == "alice" for r in calls)
    (refusal,) = [r for r in records if r.action == "guard_refused"]
    assert refusal.principal == "alice" and "'ceo'" in refusal.detail["reason"]
