"""A call's idempotency key reaches every kind of tool, so a retried call need not act twice.

Against real counterparts: a local HTTP server, real Python callables, an in-process MCP server,
and the tools handler with a real registry.
"""

from __future__ import annotations

import contextlib
import dataclasses

import httpx
import mcp.types
import pytest
from mcp.server.lowlevel import Server
from mcp.shared.memory import create_connected_server_and_client_session

from contracts import subjects
from contracts.definitions import Catalog, DefinitionsFile, HttpTool, McpServer, McpTool, PythonTool
from contracts.envelope import Envelope, Kind, ToolCall, deadline_in
from contracts.errors import InvalidRequest, ToolFailed
from services.runtime.service import Request, Service
from services.runtime.settings import Settings
from services.toolkit.context import ToolContext
from services.toolkit.http_adapter import HttpAdapter
from services.toolkit.mcp_adapter import META_IDEMPOTENCY_KEY, McpAdapter
from services.toolkit.python_adapter import PythonAdapter
from services.tools.handlers import register
from services.tools.manifest import MANIFEST
from tests.support.http import Reply, http_server
from tests.unit.test_tools_adapters import raw_server

KEY = "order-42-attempt"
CTX = ToolContext(tenant_id="acme", run_id="run-1", principal="alice", timeout_s=5.0)
KEYED = dataclasses.replace(CTX, idempotency_key=KEY)


@pytest.fixture
async def client():
    async with httpx.AsyncClient() as http:
        yield http


def adapter(client, url, **config):
    return HttpAdapter("orders", HttpTool(url=url, **config), client)


# ---- HTTP tools ----------------------------------------------------------------------------------


async def test_the_key_is_sent_as_the_idempotency_key_header(client):
    with http_server() as server:
        await adapter(client, server.url + "/orders", method="POST").call(KEYED, {"item": "anvil"})
    assert server.received[0].headers["idempotency-key"] == KEY


async def test_a_call_without_a_key_sends_no_idempotency_key_header(client):
    with http_server() as server:
        await adapter(client, server.url + "/orders", method="POST").call(CTX, {"item": "anvil"})
    assert "idempotency-key" not in server.received[0].headers


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_call_with_a_key_is_retried_after_a_503_under_the_same_key(client, method):
    with http_server() as server:
        server.replies.extend([Reply(status=503, body="busy"), Reply(body={"created": True})])
        assert await adapter(client, server.url + "/orders", method=method).call(KEYED, {}) == {"created": True}
    assert [request.headers["idempotency-key"] for request in server.received] == [KEY, KEY]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_call_without_a_key_is_not_retried(client, method):
    with http_server() as server:
        server.replies.extend([Reply(status=503, body="busy"), Reply(body={"created": True})])
        with pytest.raises(ToolFailed, match="503"):
            await adapter(client, server.url + "/orders", method=method).call(CTX, {})
    assert len(server.received) == 1


async def test_a_key_allows_no_more_tries_than_the_tool_configures(client):
    with http_server() as server:
        server.replies.extend([Reply(status=503, body="busy"), Reply(body={"created": True})])
        with pytest.raises(ToolFailed, match="503"):
            await adapter(client, server.url + "/orders", method="POST", retries=0).call(KEYED, {})
    assert len(server.received) == 1


async def test_a_configured_idempotency_key_header_cannot_override_the_runtimes(client):
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
    forged = {"Idempotency-Key": "forged", "idempotency-key": "forged", "IDEMPOTENCY-KEY": "forged"}
    async with raw_server(head) as (url, heads):
        await adapter(client, url + "/orders", method="POST", headers=forged).call(KEYED, {})
    lines = [line for line in heads[0].decode().split("\r\n") if line.lower().startswith("idempotency-key:")]
    assert [line.split(":", 1)[1].strip() for line in lines] == [KEY]


@pytest.mark.parametrize("key", ["a\r\nX-Corral-Tenant: globex", "caf\u00e9", " padded"])
async def test_a_key_that_is_no_header_value_is_refused_before_anything_is_sent(client, key):
    ctx = dataclasses.replace(CTX, idempotency_key=key)
    with http_server() as server, pytest.raises(InvalidRequest, match="idempotency key"):
        await adapter(client, server.url + "/orders", method="POST").call(ctx, {})
    assert server.received == []


# ---- Python tools --------------------------------------------------------------------------------


def sync_keyed_tool(ctx):
    return ctx.idempotency_key


async def async_keyed_tool(ctx):
    return ctx.idempotency_key


@pytest.mark.parametrize("function", ["sync_keyed_tool", "async_keyed_tool"])
@pytest.mark.parametrize(("ctx", "seen"), [(KEYED, KEY), (CTX, None)])
async def test_a_python_tool_sees_the_key_in_its_context(function, ctx, seen):
    tool = PythonAdapter("t", PythonTool(callable=f"tests.unit.test_tool_idempotency:{function}"))
    assert await tool.call(ctx, {}) == seen


# ---- MCP tools -----------------------------------------------------------------------------------


def meta_server() -> Server:
    """A real MCP server (low-level, in process) that answers with the ``_meta`` it received."""
    server = Server("meta")

    @server.list_tools()
    async def list_tools() -> list[mcp.types.Tool]:
        return [mcp.types.Tool(name="meta", inputSchema={"type": "object"})]

    @server.call_tool(validate_input=False)
    async def call_tool(name: str, arguments: dict) -> dict:
        meta = server.request_context.meta
        return {"meta": meta.model_dump(exclude_none=True) if meta else {}}

    return server


class InMemoryConnection:
    """What an adapter needs of an ``McpConnection``, over a session to an in-process server."""

    def __init__(self, session):
        self._session = session
        self.server = McpServer(name="meta", stdio={"command": "unused"})

    async def session(self):
        return self._session


@contextlib.asynccontextmanager
async def meta_tool():
    # Entered in the test itself: anyio's task group must be left by the task that entered it.
    async with create_connected_server_and_client_session(meta_server()) as session:
        yield McpAdapter("meta", McpTool(server="meta", tool="meta"), InMemoryConnection(session))


async def test_an_mcp_call_carries_the_key_in_its_meta_beside_the_tenant():
    async with meta_tool() as tool:
        meta = (await tool.call(KEYED, {}))["meta"]
    assert meta[META_IDEMPOTENCY_KEY] == KEY and meta["corral/tenant_id"] == "acme"


async def test_an_mcp_call_without_a_key_has_none_in_its_meta():
    async with meta_tool() as tool:
        meta = (await tool.call(CTX, {}))["meta"]
    assert META_IDEMPOTENCY_KEY not in meta and meta["corral/tenant_id"] == "acme"


# ---- through the tools handler -------------------------------------------------------------------


def definitions(url: str) -> DefinitionsFile:
    return DefinitionsFile.model_validate(
        {
            "tools": [
                {"name": "keyed", "python": {"callable": "tests.unit.test_tool_idempotency:sync_keyed_tool"}},
                {"name": "create_order", "http": {"url": url + "/orders", "method": "POST"}},
            ],
            "tenants": [{"tenant": "acme", "tools": ["keyed", "create_order"]}],
        }
    )


@pytest.fixture
async def handler():
    """The tools handler with a real registry, and the HTTP server its ``create_order`` tool posts to."""
    service = Service(dataclasses.replace(MANIFEST, audit=False), Settings(log_level="warning"))
    with http_server() as server:
        registry = register(service, Catalog.merge([definitions(server.url)]))

        async def call(tool, idempotency_key):
            envelope = Envelope[ToolCall](
                kind=Kind.TOOL_CALL,
                tenant_id="acme",
                run_id="run-7",
                deadline=deadline_in(10),
                idempotency_key=idempotency_key,
                payload=ToolCall(tool=tool, arguments={}),
            )
            subject = subjects.parse(subjects.tool_call("acme", tool))
            return await service.handlers["call"](Request(envelope, subject.tenant, subject, service))

        call.server = server
        try:
            yield call
        finally:
            await registry.aclose()


@pytest.mark.parametrize("key", [KEY, None])
async def test_the_envelopes_key_reaches_a_python_tool(handler, key):
    assert await handler("keyed", key) == key


async def test_the_envelopes_key_reaches_an_http_tool_and_makes_its_post_retryable(handler):
    handler.server.replies.extend([Reply(status=503, body="busy"), Reply(body={"created": True})])
    assert await handler("create_order", KEY) == {"created": True}
    assert [request.headers["idempotency-key"] for request in handler.server.received] == [KEY, KEY]
