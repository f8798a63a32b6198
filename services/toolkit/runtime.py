"""The checked call path of a tool, shared by every service that calls tools in its own process:
the tools service (for every other service, over the bus) and the workflow service (a ``local``
step's tool). Whoever calls, the same checks and context: the tenant from the subject, its
policy's tools, tenant keys removed from the arguments, the schema, the deadline, the bulkheads,
an audit record per call."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from contracts.definitions import Catalog
from contracts.errors import CorralError, ErrorCode
from services.runtime.service import Service
from services.runtime.tenant_registry import LiveTenants
from services.toolkit.arguments import check_arguments, strip_tenant
from services.toolkit.context import ToolContext
from services.toolkit.isolation import LoopIsolation
from services.toolkit.python_adapter import PythonAdapter
from services.toolkit.registry import ToolRegistry
from services.toolkit.settings import ToolsSettings
from services.toolkit.threads import ThreadBulkhead
from services.toolkit.watchdog import LoopWatchdog

REFUSED = frozenset({ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND, ErrorCode.INVALID_REQUEST})


def tool_runtime(
    service: Service, catalog: Catalog, registry: ToolRegistry | None = None, live: LiveTenants | None = None
) -> ToolRegistry:
    """The tools of ``catalog`` ready to call in ``service``'s process: the adapters, the
    per-tenant bulkheads (threads, isolation loops) and the loop watchdog, their catalog following
    the tenant registry (``live``: the service's own, else followed here), closed when it stops.
    The tools service calls them for every other service; the workflow service calls a step's
    tool itself when the step says ``local`` (services/workflow/driver.py)."""
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
    (live or service.follow_tenants(catalog)).on_change(lambda current, _: setattr(tools, "catalog", current))
    watchdog = LoopWatchdog(tools.isolation, log=service.log)
    service.on_start(tools.discover)
    service.on_start(watchdog.start)
    service.on_stop(watchdog.stop)
    service.on_stop(tools.aclose)
    return tools


async def invoke(
    tools: ToolRegistry,
    aliases: frozenset[str],
    tenant: str,
    name: str,
    arguments: dict[str, Any],
    *,
    run_id: str | None,
    principal: str | None,
    timeout_s: float,
    idempotency_key: str | None,
    audit: Callable[..., None],
    log: Any,
) -> Any:
    """Call tool ``name`` for ``tenant`` (from the subject, never the arguments): the tenant must
    be allowed it, tenant keys in the arguments are removed (and the attempt audited), the
    arguments must fit its schema, and the tool gets the runtime's context. Every call is audited
    (``audit(action, outcome, **detail)``: argument names only, never their values)."""
    arguments, removed = strip_tenant(arguments, aliases)  # a copy, without tenant keys
    if removed:
        log.warning("tenant_override_attempt", tool=name, removed=removed)
        audit("tenant_override_attempt", "refused", tool=name, removed=removed)
    started = time.perf_counter()
    try:
        adapter = tools.resolve(tenant, name)
        check_arguments(arguments, tools.validators[name], name)
        ctx = ToolContext(
            tenant_id=tenant,
            run_id=run_id,
            principal=principal,
            timeout_s=timeout_s,
            idempotency_key=idempotency_key,
        )
        output = await adapter.call(ctx, arguments)
    except CorralError as error:
        outcome = "refused" if error.code in REFUSED else "failed"
        audit("tool_call", outcome, tool=name, code=error.code.value, ms=_ms_since(started))
        error.audited = True
        raise
    audit("tool_call", "ok", tool=name, arguments=sorted(arguments), ms=_ms_since(started))
    return output


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
