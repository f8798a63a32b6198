"""Tool adapters against real counterparts: a local HTTP server, real Python callables."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import threading

import httpx
import mcp.types
import pytest
import structlog
import structlog.testing
from hypothesis import given
from hypothesis import strategies as st
from mcp.server.lowlevel import Server
from mcp.shared.memory import create_connected_server_and_client_session

from contracts.definitions import Catalog, DefinitionError, DefinitionsFile, HttpTool, McpServer, McpTool, PythonTool
from contracts.errors import DeadlineExceeded, Forbidden, InvalidRequest, NotFound, ToolFailed
from corral.nats_server import free_port
from services.toolkit.arguments import check_arguments, compile_schema, strip_tenant
from services.toolkit.context import ToolContext
from services.toolkit.http_adapter import HttpAdapter
from services.toolkit.mcp_adapter import McpAdapter, model_schema
from services.toolkit.python_adapter import PythonAdapter
from services.toolkit.registry import ToolRegistry
from tests.support.http import Reply, http_server

CTX = ToolContext(tenant_id="acme", run_id="run-1", principal="alice", timeout_s=5.0)


@pytest.fixture
async def client():
    async with httpx.AsyncClient() as http:
        yield http


def adapter(client, url, **config):
    return HttpAdapter("crm", HttpTool(url=url, **config), client)


async def test_the_tenant_goes_into_the_header_and_the_path_and_arguments_into_the_query(client):
    with http_server() as server:
        result = await adapter(client, server.url + "/tenants/{tenant_id}/customers/{customer}").call(
            CTX, {"customer": "c 1", "limit": 5}
        )
    assert result == {"ok": True}
    request = server.received[0]
    assert request.method == "GET"
    assert request.path == "/tenants/acme/customers/c%201?limit=5"
    assert request.headers["x-corral-tenant"] == "acme"
    assert request.headers["x-corral-run"] == "run-1"


async def test_post_sends_the_remaining_arguments_as_a_json_body(client):
    with http_server() as server:
        await adapter(client, server.url + "/orders", method="POST", headers={"Authorization": "Bearer s"}).call(
            CTX, {"item": "anvil", "qty": 2}
        )
    request = server.received[0]
    assert json.loads(request.body) == {"item": "anvil", "qty": 2}
    assert request.headers["authorization"] == "Bearer s"


async def test_a_tenant_header_sent_by_nobody_but_the_runtime(client):
    """Arguments can never set the tenant header: they only become query or body fields."""
    with http_server() as server:
        await adapter(client, server.url + "/x").call(CTX, {"X-Corral-Tenant": "globex"})
    assert server.received[0].headers["x-corral-tenant"] == "acme"


@pytest.mark.parametrize(("status", "match"), [(404, "HTTP 404: no such customer"), (500, "HTTP 500")])
async def test_error_statuses_become_tool_failures_with_the_status(client, status, match):
    with http_server() as server:
        server.replies.append(Reply(status=status, body="no such customer", content_type="text/plain"))
        with pytest.raises(ToolFailed, match=match):
            await adapter(client, server.url + "/x", retries=0).call(CTX, {})


async def test_idempotent_calls_are_retried_on_503_and_posts_are_not(client):
    with http_server() as server:
        server.replies.extend([Reply(status=503, body=""), Reply(body={"ok": 2})])
        assert await adapter(client, server.url + "/x").call(CTX, {}) == {"ok": 2}
        assert len(server.received) == 2
        server.replies.extend([Reply(status=503, body="busy")])
        with pytest.raises(ToolFailed, match="503"):
            await adapter(client, server.url + "/x", method="POST").call(CTX, {})
        assert len(server.received) == 3


async def test_a_response_over_the_size_limit_is_refused(client):
    with http_server() as server:
        server.replies.append(Reply(body="x" * 5000, content_type="text/plain"))
        with pytest.raises(ToolFailed, match="more than 1000 bytes"):
            await adapter(client, server.url + "/x", max_response_bytes=1000).call(CTX, {})


async def test_a_stuck_upstream_times_out(client):
    stuck = threading.Event()
    with http_server() as server:
        server.replies.append(Reply(wait=stuck))
        try:
            with pytest.raises(DeadlineExceeded, match="did not answer"):
                await adapter(client, server.url + "/x", timeout_s=0.2, retries=0).call(CTX, {})
        finally:
            stuck.set()


async def test_an_unreachable_server_is_a_tool_failure(client):
    with pytest.raises(ToolFailed, match="unreachable"):
        await adapter(client, f"http://127.0.0.1:{free_port()}/x", retries=1).call(CTX, {})


async def test_text_answers_are_returned_as_text(client):
    with http_server() as server:
        server.replies.append(Reply(body="plain words", content_type="text/plain"))
        assert await adapter(client, server.url + "/x").call(CTX, {}) == "plain words"


async def test_a_missing_path_argument_is_an_invalid_request(client):
    with pytest.raises(InvalidRequest, match="needs the argument 'customer'"):
        await adapter(client, "http://127.0.0.1:1/c/{customer}").call(CTX, {})


# ---- Python callables ------------------------------------------------------------------------


def sync_tool(ctx, **arguments):
    return {"tenant": ctx.tenant_id, "run": ctx.run_id, "arguments": arguments}


async def async_tool(ctx, **arguments):
    return {"tenant": ctx.tenant_id, "arguments": arguments}


async def slow_tool(ctx):
    await asyncio.Event().wait()  # never finishes by itself


def broken_tool(ctx):
    raise RuntimeError("database password is hunter2")


@pytest.mark.parametrize("function", ["sync_tool", "async_tool"])
async def test_python_tools_get_the_tenant_from_the_context(function):
    tool = PythonAdapter("t", PythonTool(callable=f"tests.unit.test_tools_adapters:{function}"))
    result = await tool.call(CTX, {"q": 1})
    assert result["tenant"] == "acme" and result["arguments"] == {"q": 1}


async def test_a_failing_python_tool_is_a_tool_failure_without_its_message():
    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:broken_tool"))
    with pytest.raises(ToolFailed) as caught:
        await tool.call(CTX, {})
    assert "hunter2" not in caught.value.message and "RuntimeError" in caught.value.message


async def test_a_hanging_python_tool_times_out():
    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:slow_tool"))
    with pytest.raises(DeadlineExceeded):
        await tool.call(ToolContext("acme", None, None, timeout_s=0.05), {})


async def test_unexpected_arguments_are_a_tool_failure():
    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:slow_tool"))
    with pytest.raises(ToolFailed, match="rejected its arguments"):
        await tool.call(CTX, {"nope": 1})


async def waiting_tool(ctx, rounds=3):
    for _ in range(rounds):
        await asyncio.sleep(0)  # waits on the loop, as a tool doing I/O does
    return {"tenant": ctx.tenant_id, "rounds": rounds}


async def waiting_then_broken_tool(ctx):
    await asyncio.sleep(0)
    raise RuntimeError("secret detail")


CLEANED_UP: list[str] = []


async def tool_with_cleanup(ctx):
    try:
        await asyncio.Event().wait()
    finally:
        CLEANED_UP.append(ctx.tenant_id)


async def test_a_tool_that_finishes_without_waiting_runs_without_a_timer(monkeypatch):
    def no_timer(delay):
        raise AssertionError("a timer was set")

    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:async_tool"))
    monkeypatch.setattr(asyncio, "timeout", no_timer)
    assert await tool.call(CTX, {"q": 1}) == {"tenant": "acme", "arguments": {"q": 1}}


@pytest.mark.parametrize("rounds", [1, 3])
async def test_a_tool_that_waits_is_resumed_to_its_result(rounds):
    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:waiting_tool"))
    assert await tool.call(CTX, {"rounds": rounds}) == {"tenant": "acme", "rounds": rounds}


async def test_a_tool_that_fails_after_waiting_is_a_tool_failure():
    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:waiting_then_broken_tool"))
    with pytest.raises(ToolFailed, match="failed: RuntimeError") as caught:
        await tool.call(CTX, {})
    assert "secret" not in caught.value.message


async def test_a_waiting_tool_is_cancelled_with_its_caller_and_cleans_up():
    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:tool_with_cleanup"))
    CLEANED_UP.clear()
    call = asyncio.create_task(tool.call(CTX, {}))
    await asyncio.sleep(0)  # a yield: the tool is now waiting
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert CLEANED_UP == ["acme"]


async def test_a_waiting_tool_that_overruns_is_stopped_at_the_deadline_and_cleans_up():
    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:tool_with_cleanup"))
    CLEANED_UP.clear()
    with pytest.raises(DeadlineExceeded):
        await tool.call(ToolContext("acme", None, None, timeout_s=0.05), {})
    assert CLEANED_UP == ["acme"]


def test_an_unimportable_callable_fails_at_load():
    with pytest.raises(ToolFailed, match="cannot import"):
        PythonAdapter("t", PythonTool(callable="tests.nowhere:fn"))


# ---- arguments and the registry ------------------------------------------------------------


def test_tenant_ids_smuggled_into_arguments_are_removed_at_any_depth():
    cleaned, removed = strip_tenant(
        {"q": "x", "tenant_id": "globex", "filter": {"tenantId": "globex", "items": [{"tenant": "globex", "a": 1}]}}
    )
    assert cleaned == {"q": "x", "filter": {"items": [{"a": 1}]}}
    assert removed == ["tenant_id", "filter.tenantId", "filter.items[0].tenant"]


def test_arguments_are_checked_against_the_schema():
    validator = compile_schema({"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}, "t")
    check_arguments({"q": "x"}, validator, "t")
    with pytest.raises(InvalidRequest, match="'q' is a required property"):
        check_arguments({}, validator, "t")
    with pytest.raises(InvalidRequest, match="at q"):
        check_arguments({"q": 3}, validator, "t")


def catalog(tools, tenants):
    return Catalog.merge([DefinitionsFile.model_validate({"tools": tools, "tenants": tenants})])


PY_TOOL = {"name": "echo", "python": {"callable": "tests.unit.test_tools_adapters:sync_tool"}}


@pytest.mark.parametrize("key", ["tenant_id", "TenantId", "TENANT-ID", "tenant"])
def test_a_tool_schema_may_not_offer_the_tenant_as_a_parameter_in_any_spelling(key):
    tool = {**PY_TOOL, "parameters": {"type": "object", "properties": {key: {"type": "string"}}}}
    with pytest.raises(DefinitionError, match="the runtime injects the tenant"):
        ToolRegistry(catalog([tool], []))


def test_the_registry_refuses_tools_a_tenant_is_not_allowed():
    registry = ToolRegistry(catalog([PY_TOOL], [{"tenant": "acme", "tools": ["echo"]}, {"tenant": "globex"}]))
    assert registry.resolve("acme", "echo") is registry.adapters["echo"]
    with pytest.raises(Forbidden):
        registry.resolve("globex", "echo")
    with pytest.raises(Forbidden):
        registry.resolve("initech", "echo")
    with pytest.raises(NotFound):
        registry.resolve("acme", "nope")
    assert [tool["name"] for tool in registry.schemas_for("acme")] == ["echo"]
    assert registry.schemas_for("globex") == []


def test_configured_tenant_aliases_are_removed_too():
    cleaned, removed = strip_tenant({"q": 1, "org": "globex", "tenant_id": "globex"}, frozenset({"org", "tenant_id"}))
    assert cleaned == {"q": 1} and removed == ["org", "tenant_id"]


# ---- more of the HTTP adapter: what reaches the wire -------------------------------------------


@contextlib.asynccontextmanager
async def raw_server(response_head: bytes, body_chunks: int = 0):
    """An HTTP server on a free loopback port that records raw request heads and answers with
    ``response_head`` then ``body_chunks`` kilobytes, closing the connection to end the body
    (no content-length: the client cannot know the size before reading)."""
    heads: list[bytes] = []

    async def handle(reader, writer):
        try:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(response_head)
            for _ in range(body_chunks):
                writer.write(b"x" * 1024)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client stopped reading: that is the point of the size limit
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", heads


async def test_a_streamed_response_over_the_size_limit_is_cut_off(client):
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n"
    async with raw_server(head, body_chunks=64) as (url, _):
        with pytest.raises(ToolFailed, match="more than 4096 bytes"):
            await adapter(client, url + "/x", max_response_bytes=4096, retries=0).call(CTX, {})


async def test_a_configured_header_cannot_duplicate_the_tenant_header_in_another_case(client):
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
    async with raw_server(head) as (url, heads):
        await adapter(client, url + "/x", headers={"x-corral-tenant": "globex"}).call(CTX, {})
    lines = [line for line in heads[0].decode().split("\r\n") if line.lower().startswith("x-corral-tenant:")]
    assert [line.split(":", 1)[1].strip() for line in lines] == ["acme"]


async def test_structured_query_values_are_sent_as_json_and_lists_repeat(client):
    with http_server() as server:
        await adapter(client, server.url + "/search").call(
            CTX, {"filter": {"status": "open"}, "tag": ["a", "b"], "exact": True, "page": None}
        )
    assert server.received[0].path == "/search?filter=%7B%22status%22%3A%22open%22%7D&tag=a&tag=b&exact=true"


async def test_delete_sends_arguments_in_the_query_and_put_in_the_body(client):
    with http_server() as server:
        await adapter(client, server.url + "/items/{item}", method="DELETE").call(CTX, {"item": 7, "hard": False})
        await adapter(client, server.url + "/items/{item}", method="PUT").call(CTX, {"item": 7, "qty": 3})
    deleted, put = server.received
    assert (deleted.method, deleted.path, deleted.body) == ("DELETE", "/items/7?hard=false", b"")
    assert (put.method, put.path, json.loads(put.body)) == ("PUT", "/items/7", {"qty": 3})


async def test_a_path_argument_cannot_add_path_segments(client):
    # Once sent encoded (..%2F..%2Fglobex%2Fx): a server or proxy that decodes %2F walked up. Now refused.
    with http_server() as server, pytest.raises(InvalidRequest, match="argument 'name'"):
        await adapter(client, server.url + "/tenants/{tenant_id}/files/{name}").call(CTX, {"name": "../../globex/x"})
    assert server.received == []


async def test_redirects_are_not_followed(client):
    with http_server() as server:
        server.replies.append(Reply(status=302, body="", headers={"location": server.url + "/elsewhere"}))
        with pytest.raises(ToolFailed, match="HTTP 302"):
            await adapter(client, server.url + "/x").call(CTX, {})
    assert [request.path for request in server.received] == ["/x"]


async def test_the_http_timeout_is_bounded_by_the_deadline(client):
    stuck = threading.Event()
    with http_server() as server:
        server.replies.append(Reply(wait=stuck))
        try:
            with pytest.raises(DeadlineExceeded):
                await adapter(client, server.url + "/x", timeout_s=30, retries=0).call(
                    ToolContext("acme", None, None, timeout_s=0.2), {}
                )
        finally:
            stuck.set()


# ---- more of the Python adapter ----------------------------------------------------------------


def tool_with_a_bug(ctx, q):
    return len(q) + None  # a TypeError inside the tool, not an argument problem


async def tool_with_its_own_timeout(ctx):
    raise TimeoutError("the upstream socket timed out")


class AsyncCallable:
    async def __call__(self, ctx, **arguments):
        return {"tenant": ctx.tenant_id}


async_callable = AsyncCallable()


async def test_a_type_error_inside_a_tool_is_a_failure_not_an_argument_problem():
    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:tool_with_a_bug"))
    with pytest.raises(ToolFailed, match="failed: TypeError") as caught:
        await tool.call(CTX, {"q": "x"})
    assert "rejected" not in caught.value.message


async def test_a_tools_own_timeout_is_a_failure_not_the_deadline():
    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:tool_with_its_own_timeout"))
    with pytest.raises(ToolFailed, match="failed: TimeoutError"):
        await tool.call(CTX, {})


async def test_a_hanging_sync_tool_times_out_at_the_deadline():
    release = threading.Event()
    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:sync_tool"))
    tool.function = lambda ctx, **arguments: release.wait(10)  # blocks its worker thread
    try:
        with pytest.raises(DeadlineExceeded):
            await tool.call(ToolContext("acme", None, None, timeout_s=0.05), {})
    finally:
        release.set()


async def test_an_object_with_an_async_call_is_awaited():
    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:async_callable"))
    assert tool.is_async
    assert await tool.call(CTX, {}) == {"tenant": "acme"}


async def test_a_failing_tool_is_logged_with_its_detail_and_tenant():
    tool = PythonAdapter("t", PythonTool(callable="tests.unit.test_tools_adapters:broken_tool"))
    with structlog.testing.capture_logs() as logs, pytest.raises(ToolFailed):
        await tool.call(CTX, {})
    [entry] = [entry for entry in logs if entry["event"] == "tool_raised"]
    assert entry["tenant_id"] == "acme" and entry["tool"] == "t" and entry["run_id"] == "run-1"
    assert entry["exc_info"] is True


def _kw_tool(ctx, a, b=1, *, c, d=2):
    return None


def _open_tool(ctx, a, **rest):
    return None


def _positional_tool(ctx, a, /, b=1):
    return None


@pytest.mark.parametrize("function", [_kw_tool, _open_tool, _positional_tool, sync_tool])
@pytest.mark.parametrize(
    "arguments",
    [{}, {"a": 1}, {"a": 1, "c": 3}, {"a": 1, "b": 2, "c": 3, "d": 4}, {"c": 3}, {"a": 1, "c": 3, "z": 0}, {"ctx": 1}],
)
def test_the_quick_argument_check_never_accepts_what_bind_refuses(function, arguments):
    from services.toolkit.python_adapter import _quick_check

    signature = inspect.signature(function)
    fits = _quick_check(signature)
    try:
        signature.bind(CTX, **arguments)
        binds = True
    except TypeError:
        binds = False
    assert fits is None or not fits(arguments) or binds
    if fits is not None and function is _kw_tool:
        assert fits(arguments) == binds  # exact for plain signatures


SCALAR_TYPES = ["string", "boolean", "integer", "number", "null"]
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
PROPERTY_SCHEMAS = st.one_of(
    st.sampled_from(SCALAR_TYPES).map(lambda kind: {"type": kind, "description": "d"}),
    st.sampled_from(
        [{"type": ["string", "null"]}, {"type": "array"}, {"enum": [1, "a"]}, {"type": "string", "minLength": 2}, {}]
    ),
)


@given(
    properties=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), PROPERTY_SCHEMAS, max_size=4),
    required=st.lists(st.sampled_from(["a", "b", "c", "e"]), max_size=3, unique=True),
    additional=st.sampled_from([True, False, None]),
    arguments=st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), JSON_VALUES, max_size=5),
)
def test_the_quick_schema_check_never_accepts_what_jsonschema_refuses(properties, required, additional, arguments):
    schema = {"type": "object", "properties": properties, "required": required}
    if additional is not None:
        schema["additionalProperties"] = additional
    validator = compile_schema(schema, "t")
    authority = validator.validator.is_valid(arguments)
    assert validator.is_valid(arguments) == authority  # the quick check never changes the verdict
    if validator.quick is not None and validator.quick(arguments):
        assert authority


def test_the_quick_schema_check_covers_flat_scalar_schemas_only():
    flat = {"type": "object", "properties": {"q": {"type": "string", "title": "Q"}}, "required": ["q"]}
    assert compile_schema(flat, "t").quick is not None
    for other in (
        {"type": "object", "properties": {"q": {"type": "object"}}},
        {"type": "object", "properties": {"q": {"type": "string", "pattern": "x"}}},
        {"type": "object", "additionalProperties": {"type": "string"}},
        {"type": "object", "patternProperties": {"x": {}}},
        {"type": "object", "properties": {"q": {"type": ["string", "null"]}}},
    ):
        assert compile_schema(other, "t").quick is None


# ---- the tenant argument of MCP tools is the runtime's, however a model spells it -------------


def echo_server() -> Server:
    """A real MCP server (low-level, in process) that answers with the raw arguments it received."""
    server = Server("echo")

    @server.list_tools()
    async def list_tools() -> list[mcp.types.Tool]:
        return [mcp.types.Tool(name="echo", inputSchema={"type": "object"})]

    @server.call_tool(validate_input=False)
    async def call_tool(name: str, arguments: dict) -> dict:
        meta = server.request_context.meta
        return {"arguments": arguments, "meta": (meta.model_dump() if meta else {}).get("corral/tenant_id")}

    return server


class InMemoryConnection:
    """What an adapter needs of an ``McpConnection``, over a session to an in-process server."""

    def __init__(self, session, tenant_argument):
        self._session = session
        self.server = McpServer(name="echo", stdio={"command": "unused"}, tenant_argument=tenant_argument)

    async def session(self):
        return self._session


@contextlib.asynccontextmanager
async def echo_tool(tenant_argument):
    # Entered in the test itself: anyio's task group must be left by the task that entered it.
    async with create_connected_server_and_client_session(echo_server()) as session:
        yield McpAdapter("echo", McpTool(server="echo", tool="echo"), InMemoryConnection(session, tenant_argument))


TENANT_SPELLINGS = ["TENANT_ID", "Tenant-Id", "tenantid", "tenant_ID", "TenantId", "tenant.id", "\uff54enant_id"]


async def test_no_spelling_of_the_tenant_argument_reaches_an_mcp_server():
    arguments = {"q": 1, **dict.fromkeys(TENANT_SPELLINGS, "globex"), "filter": {"Tenant": "globex", "a": 2}}
    async with echo_tool("tenant_id") as tool:
        result = await tool.call(CTX, arguments)
    assert result == {"arguments": {"q": 1, "filter": {"a": 2}, "tenant_id": "acme"}, "meta": "acme"}


async def test_a_servers_own_tenant_argument_is_the_runtimes_in_any_spelling():
    async with echo_tool("org_id") as tool:
        result = await tool.call(CTX, {"org_id": "globex", "ORG-ID": "globex", "orgId": "globex", "tenant": "globex"})
    assert result["arguments"] == {"org_id": "acme"}


def test_the_schema_shown_to_models_hides_every_spelling_of_the_tenant_argument():
    listed = mcp.types.Tool(
        name="t",
        inputSchema={
            "type": "object",
            "properties": {"q": {"type": "string"}, "org_id": {"type": "string"}, "OrgId": {"type": "string"}},
            "required": ["q", "org_id", "OrgId"],
        },
    )
    schema = model_schema(listed, "org_id")
    assert set(schema["properties"]) == {"q"} and schema["required"] == ["q"]


def test_tenant_keys_are_removed_in_any_case_or_spelling():
    cleaned, removed = strip_tenant({"q": 1, "TENANT": "g", "Tenant-ID": "g", "nested": [{"tenantID": "g"}]})
    assert cleaned == {"q": 1, "nested": [{}]}
    assert removed == ["TENANT", "Tenant-ID", "nested[0].tenantID"]
    assert strip_tenant({"ORG": "g", "organisation": "o"}, frozenset({"org"}))[0] == {"organisation": "o"}


async def test_a_templates_own_query_is_kept_and_the_arguments_follow_it(client):
    """httpx's ``params=`` replaces a URL's query: the template's ``v=2&org=acme`` used to vanish."""
    with http_server() as server:
        await adapter(client, server.url + "/search?v=2&org={tenant_id}").call(CTX, {"q": "a b", "tag": ["x", "y"]})
        await adapter(client, server.url + "/search?v=2", method="DELETE").call(CTX, {})
    assert [request.path for request in server.received] == ["/search?v=2&org=acme&q=a+b&tag=x&tag=y", "/search?v=2"]
