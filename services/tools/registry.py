"""The tool registry: adapters by name, and which tools each tenant may use."""

from __future__ import annotations

from typing import Any, Protocol

import httpx

from contracts.definitions import Catalog, DefinitionError, ToolDefinition
from contracts.errors import Forbidden, NotFound
from services.tools.arguments import TENANT_KEYS, compile_schema
from services.tools.context import ToolContext
from services.tools.http_adapter import HttpAdapter
from services.tools.python_adapter import PythonAdapter


class Adapter(Protocol):
    async def call(self, ctx: ToolContext, arguments: dict[str, Any]) -> Any: ...


class ToolRegistry:
    def __init__(self, catalog: Catalog, http: httpx.AsyncClient | None = None) -> None:
        self.catalog = catalog
        self.http = http or httpx.AsyncClient(follow_redirects=False)
        self.adapters: dict[str, Adapter] = {}
        self.validators = {}
        for tool in catalog.tools.values():
            _refuse_tenant_parameters(tool)
            self.validators[tool.name] = compile_schema(tool.parameters, f"tool {tool.name!r}")
            self.adapters[tool.name] = (
                PythonAdapter(tool.name, tool.python) if tool.python else HttpAdapter(tool.name, tool.http, self.http)  # type: ignore[arg-type]
            )

    def resolve(self, tenant: str, tool: str) -> Adapter:
        """The tool's adapter, if ``tenant`` may use it."""
        policy = self.catalog.policy(tenant)
        if policy is None or tool not in policy.tools:
            if tool not in self.catalog.tools and policy is not None:
                raise NotFound(f"unknown tool {tool!r}")
            raise Forbidden(f"tool {tool!r} is not allowed for tenant {tenant!r}")
        return self.adapters[tool]

    def schemas_for(self, tenant: str) -> list[dict[str, Any]]:
        """The tools a tenant may use, as shown to a model: name, description, parameters."""
        policy = self.catalog.policy(tenant)
        names = policy.tools if policy else []
        return [
            {
                "name": name,
                "description": self.catalog.tools[name].description,
                "parameters": self.catalog.tools[name].parameters,
            }
            for name in names
        ]

    async def aclose(self) -> None:
        await self.http.aclose()


def _refuse_tenant_parameters(tool: ToolDefinition) -> None:
    """A tool's schema must never offer the tenant as a parameter: the runtime injects it."""
    offered = set(tool.parameters.get("properties", {})) & TENANT_KEYS
    if offered:
        raise DefinitionError(f"tool {tool.name!r} must not declare {sorted(offered)}: the runtime injects the tenant")
