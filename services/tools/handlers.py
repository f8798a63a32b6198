"""The tools service's bus layer: check the tool is the subject's, then the checked call path
(services/toolkit/runtime.py): the tenant's policy, the tenant injected, the call."""

from __future__ import annotations

from typing import Any

from contracts.definitions import Catalog
from contracts.envelope import ToolCall
from contracts.errors import InvalidRequest
from services.runtime.service import Request, Service
from services.toolkit.registry import ToolRegistry
from services.toolkit.runtime import invoke, tool_runtime


def register(service: Service, catalog: Catalog, registry: ToolRegistry | None = None) -> ToolRegistry:
    """Bind the tools service's operation on ``service``."""
    tools = tool_runtime(service, catalog, registry)
    aliases = frozenset(service.settings.tenant_argument_aliases)

    @service.handler("call")
    async def call_tool(req: Request[ToolCall]) -> Any:
        name = req.subject.tool
        if name != req.payload.tool:
            raise InvalidRequest(f"the subject names tool {name!r} but the payload names {req.payload.tool!r}")
        envelope = req.envelope
        return await invoke(
            tools,
            aliases,
            req.tenant,
            name,
            req.payload.arguments,
            run_id=envelope.run_id,
            principal=envelope.principal,
            timeout_s=req.remaining(service.settings.default_timeout_s),
            idempotency_key=envelope.idempotency_key,
            audit=req.audit,
            log=req.log,
        )

    return tools
