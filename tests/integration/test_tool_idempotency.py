"""The idempotency key of a tool call sent over a real nats-server reaches the tool.

The request is sent as an executor (or the durable workflow engine) sends it: from a connection
whose reply inbox is the tenant's, with an ``Envelope[ToolCall]`` body carrying the key.
"""

from __future__ import annotations

import nats
import pytest
import yaml

from contracts import subjects
from contracts.envelope import Envelope, Kind, ToolCall, deadline_in
from contracts.replies import decode_reply
from services.runtime.catalog import load_catalog
from services.runtime.service import Service
from services.runtime.settings import Settings
from services.tools.handlers import register
from services.tools.manifest import MANIFEST
from tests.support.http import Reply, http_server

KEY = "run-9/charge-card/1"


def keyed(ctx):
    """Answers with the key the runtime gave it."""
    return {"key": ctx.idempotency_key}


@pytest.fixture
def upstream():
    with http_server() as server:
        yield server


@pytest.fixture
async def tools_service(nats_url, tmp_path, upstream):
    definitions = tmp_path / "tools.yaml"
    tools = [
        {"name": "keyed", "python": {"callable": "tests.integration.test_tool_idempotency:keyed"}},
        {"name": "charge_card", "http": {"url": upstream.url + "/charges", "method": "POST"}},
    ]
    definitions.write_text(
        yaml.safe_dump({"tools": tools, "tenants": [{"tenant": "acme", "tools": ["keyed", "charge_card"]}]})
    )
    settings = Settings(nats_url=nats_url, definitions=definitions, log_level="warning")
    service = Service(MANIFEST, settings)
    register(service, load_catalog(settings.definitions_path()))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def acme(nats_url):
    nc = await nats.connect(nats_url, inbox_prefix=subjects.inbox_prefix("acme").encode())
    yield nc
    await nc.close()


async def call(nc, tool, idempotency_key):
    envelope = Envelope[ToolCall](
        kind=Kind.TOOL_CALL,
        tenant_id="acme",
        run_id="run-9",
        deadline=deadline_in(10),
        idempotency_key=idempotency_key,
        payload=ToolCall(tool=tool, arguments={}),
    )
    reply = await nc.request(subjects.tool_call("acme", tool), envelope.model_dump_json().encode(), timeout=10)
    return decode_reply(reply.data)


@pytest.mark.usefixtures("tools_service")
@pytest.mark.parametrize("key", [KEY, None])
async def test_a_python_tool_gets_the_envelopes_key(acme, key):
    assert await call(acme, "keyed", key) == {"key": key}


@pytest.mark.usefixtures("tools_service")
async def test_a_post_with_a_key_is_retried_after_a_503_and_the_upstream_sees_the_key_twice(acme, upstream):
    upstream.replies.extend([Reply(status=503, body="busy"), Reply(body={"charged": True})])
    assert await call(acme, "charge_card", KEY) == {"charged": True}
    assert [request.headers.get("idempotency-key") for request in upstream.received] == [KEY, KEY]
