"""The tools service's bus layer: check the tool is the subject's and allowed, inject the tenant, call."""

from __future__ import annotations

from typing import Any

from contracts import subjects
from contracts.definitions import Catalog
from contracts.envelope import Kind, ToolCall
from contracts.errors import InvalidRequest
from services.runtime.service import Request, Service
from services.tools.arguments import check_arguments, strip_tenant
from services.tools.context import ToolContext
from services.tools.registry import ToolRegistry


def register(service: Service, catalog: Catalog, registry: ToolRegistry | None = None) -> ToolRegistry:
    """Declare the tools service's operation on ``service``."""
    tools = registry or ToolRegistry(catalog)
    service.on_start(tools.discover)
    service.on_stop(tools.aclose)

    @service.operation(
        subjects.TOOL_CALLS,
        Kind.TOOL_CALL,
        ToolCall,
        "Call a tool for the tenant of the subject; the runtime injects the tenant",
    )
    async def call_tool(req: Request[ToolCall]) -> Any:
        name = req.subject.tool
        if name != req.payload.tool:
            raise InvalidRequest(f"the subject names tool {name!r} but the payload names {req.payload.tool!r}")
        adapter = tools.resolve(req.tenant, name)
        arguments, removed = strip_tenant(dict(req.payload.arguments))
        if removed:
            req.log.warning("tenant_override_attempt", tool=name, removed=removed)
        check_arguments(arguments, tools.validators[name], name)
        timeout = req.envelope.remaining(service.settings.default_timeout_s)
        ctx = ToolContext(
            tenant_id=req.tenant, run_id=req.envelope.run_id, principal=req.envelope.principal, timeout_s=timeout
        )
        return await adapter.call(ctx, arguments)

    return tools
