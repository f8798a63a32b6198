"""The tool registry: adapters by name, and which tools each tenant may use."""

from __future__ import annotations

from typing import Any, Protocol

import httpx
import structlog

from contracts.definitions import Catalog, DefinitionError, ToolDefinition
from contracts.errors import CorralError, Forbidden, NotFound
from services.toolkit.arguments import TENANT_KEYS, compile_schema, is_tenant_key
from services.toolkit.context import ToolContext
from services.toolkit.http_adapter import HttpAdapter
from services.toolkit.isolation import LoopIsolation
from services.toolkit.mcp_adapter import McpAdapter, McpConnection, model_schema
from services.toolkit.python_adapter import PythonAdapter
from services.toolkit.threads import ThreadBulkhead

log = structlog.get_logger()
DEFAULT_PARAMETERS = {"type": "object"}


class Adapter(Protocol):
    async def call(self, ctx: ToolContext, arguments: dict[str, Any]) -> Any: ...


class ToolRegistry:
    def __init__(
        self,
        catalog: Catalog,
        http: httpx.AsyncClient | None = None,
        tenant_keys: frozenset[str] = TENANT_KEYS,
        threads: ThreadBulkhead | None = None,
        isolation: LoopIsolation | None = None,
    ) -> None:
        self.catalog = catalog
        self.threads = threads or ThreadBulkhead(threads=16, per_tenant=4)
        self.isolation = isolation or LoopIsolation()
        self.http = http or httpx.AsyncClient(follow_redirects=False)
        self.connections = {name: McpConnection(server) for name, server in catalog.mcp_servers.items()}
        self.adapters: dict[str, Adapter] = {}
        self.parameters: dict[str, dict[str, Any]] = {}
        self.validators: dict[str, Any] = {}
        for tool in catalog.tools.values():
            _refuse_tenant_parameters(tool, tenant_keys)
            self._set_parameters(tool.name, tool.parameters)
            if tool.python is not None:
                self.adapters[tool.name] = PythonAdapter(tool.name, tool.python, self.threads, self.isolation)
            elif tool.http is not None:
                self.adapters[tool.name] = HttpAdapter(tool.name, tool.http, self.http)
            else:
                assert tool.mcp is not None
                self.adapters[tool.name] = McpAdapter(tool.name, tool.mcp, self.connections[tool.mcp.server])

    def _set_parameters(self, tool: str, schema: dict[str, Any]) -> None:
        self.parameters[tool] = schema
        self.validators[tool] = compile_schema(schema, f"tool {tool!r}")

    async def discover(self) -> None:
        """Connect to the MCP servers and take each MCP tool's schema from its server's listing
        (unless the definition gives one). A server that is down is retried on first use."""
        for name, tool in self.catalog.tools.items():
            adapter = self.adapters.get(name)  # (a registry of some tools only has no others)
            if not isinstance(adapter, McpAdapter):
                continue
            try:
                listed = await adapter.describe()
            except CorralError as error:
                log.warning("mcp_tool_unavailable", tool=name, reason=error.message)
                continue
            if tool.parameters == DEFAULT_PARAMETERS:
                self._set_parameters(
                    name, model_schema(listed, self.connections[tool.mcp.server].server.tenant_argument)
                )  # type: ignore[union-attr]

    def resolve(self, tenant: str, tool: str) -> Adapter:
        """The tool's adapter, if ``tenant`` may use it."""
        policy = self.catalog.policy(tenant)
        if policy is None or tool not in policy.tools:
            if tool not in self.catalog.tools and policy is not None:
                raise NotFound(f"unknown tool {tool!r}")
            raise Forbidden(f"tool {tool!r} is not allowed for tenant {tenant!r}")
        adapter = self.adapters.get(tool)
        if adapter is None:  # a registry of some tools only (a workflow replica's local ones)
            raise NotFound(f"tool {tool!r} is not one this service calls itself")
        return adapter

    def schemas_for(self, tenant: str) -> list[dict[str, Any]]:
        """The tools a tenant may use, as shown to a model: name, description, parameters."""
        policy = self.catalog.policy(tenant)
        names = policy.tools if policy else []
        return [
            {
                "name": name,
                "description": self.catalog.tools[name].description,
                "parameters": self.parameters[name],
            }
            for name in names
        ]

    async def aclose(self) -> None:
        for connection in self.connections.values():
            await connection.close()
        await self.http.aclose()
        self.threads.close()
        self.isolation.close()


def _refuse_tenant_parameters(tool: ToolDefinition, tenant_keys: frozenset[str]) -> None:
    """A tool's schema must never offer the tenant as a parameter: the runtime injects it."""
    offered = {key for key in tool.parameters.get("properties", {}) if is_tenant_key(key, tenant_keys)}
    if offered:
        raise DefinitionError(f"tool {tool.name!r} must not declare {sorted(offered)}: the runtime injects the tenant")
