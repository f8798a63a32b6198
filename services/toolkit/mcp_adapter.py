"""MCP servers as tools, over stdio or streamable HTTP (the ``mcp`` package).

Each server gets one long-lived session, owned by a background task: the SDK's transports are
anyio context managers whose scopes must be closed by the task that opened them. Calls from any
task share the session (MCP multiplexes requests). The tenant is given by the runtime, in the
call's ``_meta`` and, when configured, as the tool argument ``tenant_argument``. Whatever else
the arguments hold, no key that names the tenant (``tenant_argument`` or any of
``TENANT_KEYS``, in any case or spelling a server might bind, at any depth) reaches the server:
the runtime's value is the only one it can read.

A call with an idempotency key carries it in ``_meta`` too (``corral/idempotency_key``): a call
retried after a crash comes with the same key, so a server can recognise it and not act twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import timedelta
from typing import Any

import httpx
import mcp.types
import structlog
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from contracts.definitions import McpServer, McpTool
from contracts.errors import DeadlineExceeded, NotFound, ToolFailed
from services.toolkit.arguments import TENANT_KEYS, is_tenant_key, strip_tenant
from services.toolkit.context import ToolContext

log = structlog.get_logger()

META_TENANT = "corral/tenant_id"
META_RUN = "corral/run_id"
META_IDEMPOTENCY_KEY = "corral/idempotency_key"


class McpConnection:
    """One MCP server's session, connected on first use and reconnected after a failure."""

    def __init__(self, server: McpServer) -> None:
        self.server = server
        self._session: ClientSession | None = None
        self._tools: dict[str, mcp.types.Tool] = {}
        self._owner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()

    async def session(self) -> ClientSession:
        async with self._lock:
            if self._session is None or self._owner is None or self._owner.done():
                await self._connect()
            assert self._session is not None
            return self._session

    async def tools(self) -> dict[str, mcp.types.Tool]:
        await self.session()
        return self._tools

    async def _connect(self) -> None:
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._owner = asyncio.create_task(self._own(ready), name=f"mcp-{self.server.name}")
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout=self.server.timeout_s)
        except TimeoutError:
            await self.close()
            raise ToolFailed(
                f"MCP server {self.server.name!r} did not start within {self.server.timeout_s:g}s"
            ) from None
        except Exception as exc:
            raise ToolFailed(f"MCP server {self.server.name!r} is unavailable: {type(exc).__name__}") from None

    async def _own(self, ready: asyncio.Future[None]) -> None:
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.server.stdio is not None:
                    params = StdioServerParameters(
                        command=self.server.stdio.command,
                        args=self.server.stdio.args,
                        env=self.server.stdio.env or None,
                    )
                    read, write = await stack.enter_async_context(stdio_client(params))
                else:
                    assert self.server.http is not None
                    http = await stack.enter_async_context(
                        httpx.AsyncClient(
                            headers=self.server.http.headers, timeout=httpx.Timeout(self.server.timeout_s, read=300)
                        )
                    )
                    read, write, _ = await stack.enter_async_context(
                        streamable_http_client(self.server.http.url, http_client=http)
                    )
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                self._tools = {tool.name: tool for tool in (await session.list_tools()).tools}
                self._session = session
                ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else ToolFailed("MCP connection cancelled"))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._session = None

    async def close(self) -> None:
        self._stop.set()
        if self._owner is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._owner, timeout=5)
            self._owner = None


def tenant_keys(tenant_argument: str | None) -> frozenset[str]:
    """The argument names that carry the tenant to this server: never a model's to fill."""
    return TENANT_KEYS | {tenant_argument} if tenant_argument else TENANT_KEYS


def model_schema(tool: mcp.types.Tool, tenant_argument: str | None) -> dict[str, Any]:
    """The server's input schema without the tenant argument (in any spelling): that one is the runtime's."""
    schema = dict(tool.inputSchema or {"type": "object"})
    keys = tenant_keys(tenant_argument)
    properties = schema.get("properties") or {}
    if any(is_tenant_key(name, keys) for name in properties):
        schema["properties"] = {k: v for k, v in properties.items() if not is_tenant_key(k, keys)}
    if schema.get("required"):
        schema["required"] = [name for name in schema["required"] if not is_tenant_key(name, keys)]
    return schema


class McpAdapter:
    """One tool of an MCP server, called with the runtime's tenant."""

    def __init__(self, name: str, config: McpTool, connection: McpConnection) -> None:
        self.name = name
        self.config = config
        self.connection = connection
        self.tenant_keys = tenant_keys(connection.server.tenant_argument)

    async def describe(self) -> mcp.types.Tool:
        tools = await self.connection.tools()
        if self.config.tool not in tools:
            raise NotFound(f"MCP server {self.config.server!r} has no tool {self.config.tool!r}")
        return tools[self.config.tool]

    async def call(self, ctx: ToolContext, arguments: dict[str, Any]) -> Any:
        session = await self.connection.session()
        tenant_argument = self.connection.server.tenant_argument
        # The tools service already removed its configured tenant keys; this server's own
        # `tenant_argument` (say `org_id`, sent as `ORG-ID`) may not be among them.
        arguments, removed = strip_tenant(arguments, self.tenant_keys)
        if removed:
            log.warning("tenant_override_attempt", tool=self.name, tenant_id=ctx.tenant_id, removed=removed)
        if tenant_argument:
            arguments[tenant_argument] = ctx.tenant_id
        meta = {META_TENANT: ctx.tenant_id, META_RUN: ctx.run_id}
        if ctx.idempotency_key:
            meta[META_IDEMPOTENCY_KEY] = ctx.idempotency_key
        try:
            result = await asyncio.wait_for(
                session.call_tool(
                    self.config.tool, arguments, read_timeout_seconds=timedelta(seconds=ctx.timeout_s), meta=meta
                ),
                timeout=ctx.timeout_s,
            )
        except TimeoutError:
            raise DeadlineExceeded(f"tool {self.name!r} did not finish within {ctx.timeout_s:.1f}s") from None
        except mcp.shared.exceptions.McpError as exc:
            raise ToolFailed(f"tool {self.name!r} failed: {exc.error.message[:200]}") from None
        return _output(self.name, result)


def _output(name: str, result: mcp.types.CallToolResult) -> Any:
    texts = [block.text for block in result.content if isinstance(block, mcp.types.TextContent)]
    if result.isError:
        raise ToolFailed(f"tool {name!r} failed: {' '.join(texts)[:200]}")
    if result.structuredContent is not None:
        return result.structuredContent
    if len(texts) == 1:
        try:
            return json.loads(texts[0])
        except ValueError:
            return texts[0]
    return texts
