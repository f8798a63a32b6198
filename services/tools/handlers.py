"""The tools service's bus layer: check the tool is the subject's and allowed, inject the tenant, call."""

from __future__ import annotations

import time
from typing import Any

from contracts.definitions import Catalog
from contracts.envelope import ToolCall
from contracts.errors import CorralError, ErrorCode, InvalidRequest
from services.runtime.service import Request, Service
from services.tools.arguments import check_arguments, strip_tenant
from services.tools.context import ToolContext
from services.tools.isolation import LoopIsolation
from services.tools.python_adapter import PythonAdapter
from services.tools.registry import ToolRegistry
from services.tools.settings import ToolsSettings
from services.tools.threads import ThreadBulkhead
from services.tools.watchdog import LoopWatchdog

REFUSED = frozenset({ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND, ErrorCode.INVALID_REQUEST})


def register(service: Service, catalog: Catalog, registry: ToolRegistry | None = None) -> ToolRegistry:
    """Bind the tools service's operation on ``service``."""
    aliases = frozenset(service.settings.tenant_argument_aliases)
    settings = ToolsSettings.of(service.settings)
    threads = ThreadBulkhead(threads=settings.tool_threads, per_tenant=settings.tool_threads_per_tenant)
    isolation = LoopIsolation(
        block_s=settings.tool_loop_block_ms / 1000,
        isolated=settings.tool_isolated,
        loops=settings.tool_isolation_loops,
        per_tenant=settings.tool_isolated_calls_per_tenant,
        log=service.log,
    )
    tools = registry or ToolRegistry(catalog, tenant_keys=aliases, threads=threads, isolation=isolation)
    _check_isolated(service, tools, settings.tool_isolated)
    # A tenant's tools follow the registry. A tool taken from a tenant is refused from its next
    # call on, a run already started included: a revocation takes effect at once.
    service.follow_tenants(catalog).on_change(lambda current, _: setattr(tools, "catalog", current))
    watchdog = LoopWatchdog(tools.isolation, log=service.log)
    service.on_start(tools.discover)
    service.on_start(watchdog.start)
    service.on_stop(watchdog.stop)
    service.on_stop(tools.aclose)

    @service.handler("call")
    async def call_tool(req: Request[ToolCall]) -> Any:
        name = req.subject.tool
        if name != req.payload.tool:
            raise InvalidRequest(f"the subject names tool {name!r} but the payload names {req.payload.tool!r}")
        arguments, removed = strip_tenant(req.payload.arguments, aliases)  # a copy, without tenant keys
        if removed:
            req.log.warning("tenant_override_attempt", tool=name, removed=removed)
            req.audit("tenant_override_attempt", "refused", tool=name, removed=removed)
        started = time.perf_counter()
        try:
            adapter = tools.resolve(req.tenant, name)
            check_arguments(arguments, tools.validators[name], name)
            envelope = req.envelope
            ctx = ToolContext(
                tenant_id=req.tenant,
                run_id=envelope.run_id,
                principal=envelope.principal,
                timeout_s=req.remaining(service.settings.default_timeout_s),
                idempotency_key=envelope.idempotency_key,
            )
            output = await adapter.call(ctx, arguments)
        except CorralError as error:
            outcome = "refused" if error.code in REFUSED else "failed"
            req.audit("tool_call", outcome, tool=name, code=error.code.value, ms=_ms_since(started))
            error.audited = True
            raise
        # Who called what and how it went: argument names only, never their values.
        req.audit("tool_call", "ok", tool=name, arguments=sorted(arguments), ms=_ms_since(started))
        return output

    return tools


def _check_isolated(service: Service, tools: ToolRegistry, named: tuple[str, ...]) -> None:
    """Say so at start when ``CORRAL_TOOL_ISOLATED`` names what it cannot isolate (a typo would
    otherwise leave the tool on the service's loop without a word)."""
    ignored = [
        name
        for name in named
        if name != "*" and not (isinstance(adapter := tools.adapters.get(name), PythonAdapter) and adapter.is_async)
    ]
    if ignored:
        service.log.warning("tool_isolated_ignored", tools=ignored, reason="not an async Python tool")


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
