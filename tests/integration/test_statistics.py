"""Every replica's per-operation, per-tenant statistics are readable over the bus (corral.stats.<service>)."""

from __future__ import annotations

import json

import nats
import pytest

from contracts import subjects
from contracts.envelope import Kind, RouterRequest, new_envelope_json
from corral.client import CorralClient
from corral.state import ADMIN_USER
from services.auth.tokens import mint_dev_token
from tests.support.services import running_services


@pytest.fixture
async def system(secured):
    async with running_services(secured.url, secured.state_dir, ("auth", "router", "graph", "tools")) as services:
        yield secured, services


async def admin(broker) -> nats.NATS:
    return await nats.connect(
        broker.url, user=ADMIN_USER, password=broker.secrets.passwords[ADMIN_USER], inbox_prefix=b"_INBOX._admin"
    )


async def stats_of(nc: nats.NATS, service: str, request: dict | None = None) -> dict:
    reply = await nc.request(subjects.stats(service), json.dumps(request or {}).encode(), timeout=5)
    return json.loads(reply.data)


def endpoint(snapshot: dict, name: str) -> dict:
    (found,) = [e for e in snapshot["endpoints"] if e["name"] == name]
    return found


async def test_each_service_counts_messages_per_tenant_and_operation(system):
    broker, _ = system
    clients = {
        tenant: await CorralClient.connect(
            broker.url, tenant=tenant, token=mint_dev_token(tenant, key=broker.secrets.dev_key)
        )
        for tenant in ("acme", "globex")
    }
    console = await admin(broker)
    try:
        for _ in range(3):
            await clients["acme"].request("where is my order?", watch=False)
        await clients["globex"].request("where is my order?", watch=False)
        router = endpoint(await stats_of(console, "router"), "request")
        graph = endpoint(await stats_of(console, "graph"), "run")
        tools = endpoint(await stats_of(console, "tools"), "call")
    finally:
        for client in clients.values():
            await client.close()
        await console.close()
    for found in (router, graph, tools):
        assert found["tenants"]["acme"]["num_requests"] == 3
        assert found["tenants"]["globex"]["num_requests"] == 1
        assert found["num_requests"] == 4 and found["num_errors"] == 0
        assert found["p50_ms"] is not None and found["in_flight"] == 0
    assert router["subject"] == subjects.ROUTER_REQUESTS and router["queue_group"] == "router"


async def test_refusals_and_errors_are_counted_by_kind_for_the_tenant_of_the_subject(system):
    broker, _ = system
    acme = await nats.connect(
        broker.url,
        token=mint_dev_token("acme", key=broker.secrets.dev_key),
        inbox_prefix=subjects.inbox_prefix("acme").encode(),
    )
    console = await admin(broker)
    try:
        forged = new_envelope_json(Kind.REQUEST, "globex", RouterRequest(input={"text": "hi"}))
        await acme.request(subjects.router_request("acme", "dev"), forged, timeout=5)  # answered with a typed error
        unknown = new_envelope_json(Kind.REQUEST, "acme", RouterRequest(target="nope", input={"text": "hi"}))
        await acme.request(subjects.router_request("acme", "dev"), unknown, timeout=5)
        router = endpoint(await stats_of(console, "router", {"tenants": ["acme"]}), "request")
    finally:
        await acme.close()
        await console.close()
    assert router["tenants"]["acme"]["refusals"] == {"tenant_mismatch": 1}
    assert router["tenants"]["acme"]["errors"] == {"not_found": 1}
    assert set(router["tenants"]) == {"acme"}  # only the tenants asked for


async def test_a_malformed_statistics_request_gets_a_typed_error(system):
    broker, _ = system
    console = await admin(broker)
    try:
        reply = await console.request(subjects.stats("router"), b'{"limit": "all"}', timeout=5)
    finally:
        await console.close()
    assert json.loads(reply.data)["error"]["code"] == "invalid_request"


async def test_a_tenant_cannot_read_statistics(system):
    broker, _ = system
    errors = []

    async def on_error(error):
        errors.append(str(error))

    acme = await nats.connect(
        broker.url,
        token=mint_dev_token("acme", key=broker.secrets.dev_key),
        inbox_prefix=subjects.inbox_prefix("acme").encode(),
        error_cb=on_error,
    )
    try:
        await acme.publish(subjects.stats("router"), b"{}")
        await acme.flush()
        await acme.flush()
    finally:
        await acme.close()
    assert any("permissions violation" in error and "corral.stats.router" in error for error in errors)


async def test_the_auth_service_counts_connections_granted_and_denied_per_tenant(system):
    """The callout responder lives in its own account; its statistics answer from APP, counted for
    the verified tenant (a refusal only for a tenant a trusted key signed for)."""
    broker, _ = system
    key = broker.secrets.dev_key
    acme = await nats.connect(
        broker.url, token=mint_dev_token("acme", key=key), inbox_prefix=subjects.inbox_prefix("acme").encode()
    )
    await acme.close()
    with pytest.raises(Exception):  # noqa: B017 - the broker refuses the connection
        await nats.connect(
            broker.url,
            token=mint_dev_token("globex", key=key, ttl_s=-60),  # signed by a trusted key, expired
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=5,
        )
    with pytest.raises(Exception):  # noqa: B017
        await nats.connect(
            broker.url, token="not-a-token", allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5
        )
    console = await admin(broker)
    try:
        snapshot = await stats_of(console, "auth")
    finally:
        await console.close()
    callout = endpoint(snapshot, "callout")
    assert callout["tenants"]["acme"]["num_requests"] >= 1 and callout["tenants"]["acme"]["num_errors"] == 0
    assert callout["tenants"]["globex"]["errors"] == {"unauthorized": 1}
    assert callout["tenants"]["_unknown"]["errors"] == {"unauthorized": 1}  # an unverifiable claim names nobody
