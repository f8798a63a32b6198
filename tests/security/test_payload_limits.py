"""A tenant's ``connection.max_payload_bytes`` holds although the broker ignores it for callout
users (nats-server issue 5002, docs/security.md): every tenant-facing operation refuses a larger
message at admission, before decoding it, with a typed error; other tenants keep their own limit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from contracts import subjects
from contracts.envelope import Kind, RouterRequest, new_envelope_json
from contracts.errors import InvalidRequest, Unavailable
from contracts.replies import decode_reply
from tests.security.conftest import tenant_connection
from tests.support.services import DEFAULT_DEFINITIONS, running_services

LIMIT = 2048


def definitions(folder: Path) -> str:
    """The demo tenants, and ``tiny`` whose connections may publish at most LIMIT bytes."""
    folder.mkdir()
    route = {"order_status": {"pattern": "graph", "graph": "order_status"}}
    tiny = {
        "tenant": "tiny",
        "default_route": "order_status",
        "routes": route,
        "tools": ["orders_lookup"],
        "max_input_bytes": 1024,
        "connection": {"max_payload_bytes": LIMIT},
    }
    (folder / "tiny.yaml").write_text(yaml.safe_dump({"tenants": [tiny]}))
    return os.pathsep.join((str(DEFAULT_DEFINITIONS), str(folder)))


async def test_a_message_over_the_tenants_payload_limit_is_refused_before_it_is_decoded(secured, tmp_path):
    paths = definitions(tmp_path / "extra")
    async with running_services(secured.url, secured.state_dir, ("auth", "router"), definitions=paths) as services:
        big = new_envelope_json(Kind.REQUEST, "tiny", RouterRequest(input={"text": "x" * LIMIT}, stream=False))
        conn = await tenant_connection(secured, "tiny")
        try:
            reply = await conn.nc.request(subjects.router_request("tiny", "dev"), big, timeout=5)
            small = new_envelope_json(Kind.REQUEST, "tiny", RouterRequest(input={"text": "x" * 900}, stream=False))
            await conn.nc.request(subjects.router_request("tiny", "dev"), small, timeout=5)
        finally:
            await conn.nc.close()
        with pytest.raises(
            InvalidRequest, match=rf"over the tenant's limit of {LIMIT} \(connection.max_payload_bytes\)"
        ):
            decode_reply(reply.data)
        (endpoint,) = [e for e in services["router"].stats.snapshot()["endpoints"] if e["name"] == "request"]
        assert endpoint["tenants"]["tiny"]["refusals"] == {"invalid_request": 1}
        assert endpoint["tenants"]["tiny"]["num_requests"] == 1  # only the small one was handled
        # Another tenant's limit is its own (the default): the same message is handled.
        acme = await tenant_connection(secured, "acme")
        try:
            same = new_envelope_json(Kind.REQUEST, "acme", RouterRequest(input={"text": "x" * LIMIT}, stream=False))
            answer = await acme.nc.request(subjects.router_request("acme", "dev"), same, timeout=5)
        finally:
            await acme.nc.close()
        with pytest.raises(Unavailable, match=r"no service is serving t\.acme\.graph\.run"):
            decode_reply(answer.data)  # admitted and routed (no graph service runs in this test)
