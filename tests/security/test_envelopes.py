"""Layer 2, the envelope: forged, malformed, oversized and nested bodies are refused with a typed
error, nothing leaks, and the services keep serving."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from contracts import subjects
from contracts.envelope import MAX_MESSAGE_BYTES, Envelope, Kind, RouterRequest
from contracts.errors import InvalidRequest, TenantMismatch
from contracts.replies import decode_reply
from services.auth.tokens import mint_dev_token
from tests.security.conftest import still_serving, tenant_connection

pytestmark = pytest.mark.usefixtures("system")


def valid(**changes):
    body = json.loads(
        Envelope[RouterRequest](
            kind=Kind.REQUEST, tenant_id="acme", payload=RouterRequest(input={"text": "where is my order?"})
        ).model_dump_json()
    )
    body.update(changes)
    return json.dumps(body).encode()


BAD_BODIES = {
    "tenant mismatch": (valid(tenant_id="globex"), TenantMismatch),
    "malformed json": (b'{"kind": "request", "tenant_id": "acme", "payload": {', InvalidRequest),
    "not an object": (b"[1, 2, 3]", InvalidRequest),
    "wrong types": (valid(payload={"target": 42, "input": "text"}), InvalidRequest),
    "unknown schema version": (valid(schema_version=2), InvalidRequest),
    "unknown field": (valid(is_admin=True), InvalidRequest),
    "wrong kind": (valid(kind="tool_call"), InvalidRequest),
    "wildcard run id": (valid(run_id="x.>"), InvalidRequest),
    "wildcard target": (valid(payload={"target": "*"}), InvalidRequest),
    "binary": (b"\x00\xff" * 100, InvalidRequest),
    "deep nesting": (valid(payload={"input": {"a": json.loads("[" * 400 + "]" * 400)}}), InvalidRequest),
    "just under the size limit": (b" " * (MAX_MESSAGE_BYTES - 2048) + b"{}", InvalidRequest),
    "input over the tenant's limit": (valid(payload={"input": {"text": "x" * 200_000}}), InvalidRequest),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
async def test_a_bad_request_gets_a_typed_error_and_the_router_keeps_serving(system, name):
    broker, _ = system
    body, error = BAD_BODIES[name]
    acme = await tenant_connection(broker, "acme")
    try:
        reply = await acme.nc.request(subjects.router_request("acme", "dev"), body, timeout=10)
        with pytest.raises(error):
            decode_reply(reply.data)
    finally:
        await acme.nc.close()
    await still_serving(broker)


async def test_a_message_over_the_servers_max_payload_is_cut_off_by_the_server(system):
    """A client that skips nats-py's own size check: the server refuses and drops the connection."""
    broker, _ = system
    host, port = broker.url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        token = mint_dev_token("acme", key=broker.secrets.dev_key)
        writer.write(f'CONNECT {{"auth_token": "{token}", "verbose": false}}\r\nPING\r\n'.encode())
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"PONG")
        size = MAX_MESSAGE_BYTES + 1024
        writer.write(f"PUB {subjects.router_request('acme', 'dev')} {size}\r\n".encode() + b"x" * size + b"\r\n")
        try:
            # The server refuses on the PUB line and closes: often before the payload is all
            # written, in which case the close arrives as a reset instead of the -ERR line.
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), 5)
        except ConnectionResetError:
            answer = b"reset"
        assert b"Maximum Payload" in answer or answer == b"reset"
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # and the connection is gone
    finally:
        writer.close()
    await still_serving(broker)


async def test_a_reply_subject_in_another_tenants_inbox_gets_nothing_there(system):
    broker, _ = system
    globex = await tenant_connection(broker, "globex")
    leaked = []

    async def collect(msg):
        leaked.append(msg)

    await globex.nc.subscribe("_INBOX.globex.>", cb=collect)
    await globex.nc.flush()
    await globex.nc.flush()  # nats-py 2.16 may send a flush's PING ahead of the SUB: twice is a barrier
    attacker = await tenant_connection(broker, "acme")
    try:
        await attacker.nc.publish(subjects.router_request("acme", "dev"), valid(), reply="_INBOX.globex.stolen")
        await attacker.nc.flush()
        await still_serving(broker)  # a later request is answered, so the spoofed one was handled
        await globex.nc.flush()
    finally:
        await attacker.nc.close()
        await globex.nc.close()
    assert leaked == []
