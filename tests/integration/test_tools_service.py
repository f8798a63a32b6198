"""The tools service on a real nats-server: tenant-scoped data, typed refusals, and it keeps serving.

Requests are sent the way an executor would send them, from a connection whose reply inbox is the
tenant's (``_INBOX.<tenant>``), with ``Envelope[ToolCall]`` bodies; replies are read with the
runtime's ``decode_reply``, which raises the typed error an error reply carries.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import nats
import pytest
import yaml

from contracts import subjects
from contracts.envelope import Envelope, Kind, ToolCall, deadline_in
from contracts.errors import Forbidden, InvalidRequest, NotFound, TenantMismatch
from contracts.replies import decode_reply
from corral.demo.tools import reload_settings
from corral.state import init_state
from services.runtime.catalog import load_catalog
from services.runtime.service import Service
from services.runtime.settings import Settings
from services.tools.handlers import register
from services.tools.manifest import MANIFEST
from tests.support.services import answering

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS = {
    "tools": [
        {
            "name": "orders_lookup",
            "python": {"callable": "corral.demo.tools:lookup_orders"},
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        },
        {"name": "whoami", "python": {"callable": "tests.integration.test_tools_service:whoami"}},
        {"name": "payroll_export", "python": {"callable": "tests.integration.test_tools_service:whoami"}},
    ],
    "tenants": [
        {"tenant": "acme", "tools": ["orders_lookup", "whoami"]},
        {"tenant": "globex", "tools": ["orders_lookup", "whoami", "payroll_export"]},
    ],
}


async def whoami(ctx, **arguments):
    """Tells the caller which tenant the runtime gave it, and what arguments reached it."""
    return {"tenant": ctx.tenant_id, "arguments": arguments}


@pytest.fixture
def definitions(tmp_path, monkeypatch):
    monkeypatch.delenv("CORRAL_DEMO_DATA", raising=False)  # the shipped demo data
    reload_settings()
    path = tmp_path / "tools.yaml"
    path.write_text(yaml.safe_dump(DEFINITIONS))
    return path


@pytest.fixture
async def tools_service(nats_url, definitions):
    settings = Settings(nats_url=nats_url, definitions=definitions, log_level="warning")
    service = Service(MANIFEST, settings)
    register(service, load_catalog(settings.definitions_path()))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def connect(nats_url):
    """Connections whose reply inbox is a tenant's, closed at the end of the test."""
    opened = []

    async def open_for(tenant: str):
        nc = await nats.connect(nats_url, inbox_prefix=subjects.inbox_prefix(tenant).encode())
        opened.append(nc)
        return nc

    yield open_for
    for nc in opened:
        await nc.close()


async def call(nc, tenant, tool, arguments, *, envelope_tenant=None, subject=None):
    envelope = Envelope[ToolCall](
        kind=Kind.TOOL_CALL,
        tenant_id=envelope_tenant or tenant,
        run_id="run-1",
        deadline=deadline_in(10),
        payload=ToolCall(tool=tool, arguments=arguments),
    )
    return await send(nc, subject or subjects.tool_call(tenant, tool), envelope.model_dump_json().encode())


async def send(nc, subject, body):
    reply = await nc.request(subject, body, timeout=10)
    return decode_reply(reply.data)


@pytest.mark.usefixtures("tools_service")
@pytest.mark.parametrize(("tenant", "prefix"), [("acme", "A-"), ("globex", "G-")])
async def test_each_tenant_gets_its_own_orders(connect, tenant, prefix):
    nc = await connect(tenant)
    output = await call(nc, tenant, "orders_lookup", {"query": "where is my order?"})
    assert output["found"] is True and output["order"]["id"].startswith(prefix)
    assert all(order["id"].startswith(prefix) for order in output["orders"])


@pytest.mark.usefixtures("tools_service")
async def test_the_same_question_gets_different_answers_per_tenant(connect):
    acme, globex = await connect("acme"), await connect("globex")
    from_acme = await call(acme, "acme", "orders_lookup", {"query": "A-1001"})
    from_globex = await call(globex, "globex", "orders_lookup", {"query": "A-1001"})
    assert from_acme["order"]["item"] == "Rocket skates"
    assert from_globex["found"] is False and from_globex["order"] is None


@pytest.mark.usefixtures("tools_service")
async def test_a_tenant_id_in_the_arguments_does_not_change_the_tenant(connect):
    nc = await connect("acme")
    output = await call(nc, "acme", "whoami", {"tenant_id": "globex", "scope": {"tenant_id": "globex", "x": 1}})
    assert output == {"tenant": "acme", "arguments": {"scope": {"x": 1}}}
    orders = await call(nc, "acme", "orders_lookup", {"query": "G-2201", "tenant_id": "globex"})
    assert orders["found"] is False and all(order["id"].startswith("A-") for order in orders["orders"])


async def still_serving(nc):
    assert (await call(nc, "acme", "whoami", {}))["tenant"] == "acme"


@pytest.mark.usefixtures("tools_service")
async def test_a_tool_the_tenant_is_not_allowed_is_forbidden(connect):
    nc = await connect("acme")
    with pytest.raises(Forbidden, match="not allowed for tenant 'acme'"):
        await call(nc, "acme", "payroll_export", {})
    await still_serving(nc)


@pytest.mark.usefixtures("tools_service")
async def test_an_unknown_tool_is_not_found(connect):
    nc = await connect("acme")
    with pytest.raises(NotFound):
        await call(nc, "acme", "no_such_tool", {})
    await still_serving(nc)


@pytest.mark.usefixtures("tools_service")
async def test_an_envelope_of_another_tenant_on_this_tenants_subject_is_a_mismatch(connect):
    nc = await connect("acme")
    with pytest.raises(TenantMismatch):
        await call(nc, "acme", "whoami", {}, envelope_tenant="globex")
    await still_serving(nc)


@pytest.mark.usefixtures("tools_service")
async def test_a_payload_naming_another_tool_than_the_subject_is_invalid(connect):
    nc = await connect("acme")
    with pytest.raises(InvalidRequest, match="the subject names tool"):
        await call(nc, "acme", "payroll_export", {}, subject=subjects.tool_call("acme", "whoami"))
    await still_serving(nc)


@pytest.mark.usefixtures("tools_service")
@pytest.mark.parametrize("body", [b"{not json", b"", b"[]", json.dumps({"kind": "tool_call"}).encode()])
async def test_a_malformed_body_is_an_invalid_request(connect, body):
    nc = await connect("acme")
    with pytest.raises(InvalidRequest):
        await send(nc, subjects.tool_call("acme", "whoami"), body)
    await still_serving(nc)


@pytest.mark.usefixtures("tools_service")
async def test_missing_required_arguments_are_an_invalid_request(connect):
    nc = await connect("acme")
    with pytest.raises(InvalidRequest, match="'query' is a required property"):
        await call(nc, "acme", "orders_lookup", {})
    await still_serving(nc)


@pytest.mark.usefixtures("tools_service")
async def test_a_reply_subject_in_another_tenants_inbox_gets_no_answer(connect):
    globex_inbox = await connect("globex")
    sub = await globex_inbox.subscribe("_INBOX.globex.stolen")
    attacker = await connect("acme")
    envelope = Envelope[ToolCall](
        kind=Kind.TOOL_CALL, tenant_id="acme", payload=ToolCall(tool="orders_lookup", arguments={"query": "x"})
    )
    await globex_inbox.flush()
    await attacker.publish(
        subjects.tool_call("acme", "orders_lookup"), envelope.model_dump_json().encode(), reply="_INBOX.globex.stolen"
    )
    await still_serving(attacker)  # handled after the stolen-reply request (same connection, in order)
    await globex_inbox.flush()  # anything sent to globex before now has arrived
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.1)


# ---- the real entry point --------------------------------------------------------------------


async def test_python_m_services_tools_starts_serves_and_stops_on_sigterm(nats_url, definitions, tmp_path, connect):
    state_dir = tmp_path / "state"
    # The service reads its credentials here (the plain test server ignores them).
    init_state(state_dir, port=urlsplit(nats_url).port)
    env = {
        **os.environ,
        "CORRAL_NATS_URL": nats_url,
        "CORRAL_STATE_DIR": str(state_dir),
        "CORRAL_DEFINITIONS": str(definitions),
        "CORRAL_LOG_LEVEL": "warning",
    }
    process = subprocess.Popen([sys.executable, "-m", "services.tools"], cwd=ROOT, env=env)
    try:
        nc = await connect("acme")
        await answering(nc, "tools", process)
        output = await call(nc, "acme", "orders_lookup", {"query": "A-1002"})
        assert output["order"]["status"] == "delayed at the depot"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
