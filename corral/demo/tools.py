"""The demo data tool: each tenant's orders, chosen by the tenant the runtime injects.

The query can never pick the tenant: the data folder comes from ``ctx.tenant_id`` only (checked
against the tenant id grammar again here, so no id can walk out of the data folder). The folder is the
packaged ``corral/demo/data`` unless ``CORRAL_DEMO_DATA`` names another.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from contracts.tenants import validate_tenant_id
from corral.demo import DATA
from services.toolkit.context import ToolContext

ORDER_ID = re.compile(r"\b[A-Z]-\d{3,6}\b")


def data_folder() -> Path:
    """Where the demo data lives: ``CORRAL_DEMO_DATA``, else the data shipped with the package."""
    return Path(os.environ.get("CORRAL_DEMO_DATA") or DATA)


@lru_cache(maxsize=1)
def _configured() -> str:
    """``CORRAL_DEMO_DATA`` as the process started with it (reading the environment on every
    call, missing variable and all, was a fifth of a lookup); ``reload_settings`` re-reads it."""
    return os.environ.get("CORRAL_DEMO_DATA") or ""


def reload_settings() -> None:
    """Read ``CORRAL_DEMO_DATA`` again (tests change it)."""
    _configured.cache_clear()


def _records(tenant: str, kind: str) -> tuple[dict[str, Any], ...]:
    # Keyed by the variable's text, not a Path: building Paths per call was most of the lookup.
    return _read(_configured(), validate_tenant_id(tenant), kind)


# Bounded, and large enough for `corral bench --tenants 10000` (two kinds each): with 1,024 a
# many-tenant run missed on every call and read files, a fifth of the tools service's CPU.
@lru_cache(maxsize=32_768)
def _read(configured: str, tenant: str, kind: str) -> tuple[dict[str, Any], ...]:
    """A tenant's records of one kind, read once per folder (demo data does not change while it runs)."""
    folder = Path(configured) if configured else data_folder()
    path = folder / tenant / f"{kind}.json"
    if not path.is_file():
        return ()
    records = json.loads(path.read_text())
    if kind == "orders":  # most recent first, sorted once here rather than on every lookup
        records.sort(key=lambda order: order["placed_at"], reverse=True)
    return tuple(records)


async def lookup_orders(ctx: ToolContext, query: str) -> dict[str, Any]:
    """The order the query names (``A-1001``), else the most recent one, of the calling tenant."""
    return find_order(ctx.tenant_id, query)


def find_order(tenant: str, query: str) -> dict[str, Any]:
    """The lookup itself, also called in process by the LangGraph side of ``corral bench``.

    ``orders`` is every order of the tenant, most recent first. A query that names only order ids
    the tenant does not have (another tenant's, say) finds nothing rather than some other order.
    """
    orders = list(_records(tenant, "orders"))
    mentioned = set(ORDER_ID.findall(query.upper()))
    named = [order for order in orders if order["id"] in mentioned]
    if not orders or (mentioned and not named):
        return {"found": False, "order": None, "orders": orders, "order_count": len(orders)}
    chosen = named[0] if named else orders[0]
    return {"found": True, "order": chosen, "orders": orders, "order_count": len(orders)}


async def lookup_incidents(ctx: ToolContext, category: str | None = None) -> dict[str, Any]:
    """The calling tenant's open incidents, optionally of one category."""
    incidents = [
        incident
        for incident in _records(ctx.tenant_id, "incidents")
        if incident["status"] == "open" and (category is None or incident["category"] == category)
    ]
    titles = "; ".join(incident["title"] for incident in incidents) or "none"
    return {"open": len(incidents), "incidents": incidents, "summary": titles}


async def bench_step(ctx: ToolContext, value: int = 0, delay_ms: float = 0) -> dict[str, Any]:
    """One step of ``corral bench workflow``'s five-step workflow: the same trivial step the other
    engines run (add one), optionally slowed (the recovery measurement's runs are mid-way)."""
    if delay_ms:
        import asyncio

        await asyncio.sleep(delay_ms / 1000)
    return {"value": value + 1}


# ---- the refund workflow's tools -----------------------------------------------------------
# Stand-ins for a tenant's order system, kept in the tools process. The refund itself is an HTTP
# tool: a POST to the demo payments API (corral/demo/payments.py), which honours the call's
# idempotency key the way a payment API does.
_HOLDS: dict[tuple[str, str], str] = {}


async def order_details(ctx: ToolContext, order_id: str) -> dict[str, Any]:
    """One order of the calling tenant, with its amount; ``found`` false for any other id."""
    found = find_order(ctx.tenant_id, order_id)
    order = found["order"] if found["found"] and order_id.upper() in found["order"]["id"] else None
    return {"found": order is not None, "order": order}


async def hold_order(ctx: ToolContext, order_id: str) -> dict[str, Any]:
    """Put the order on hold while its refund is decided (undone by ``release_order``)."""
    _HOLDS[(ctx.tenant_id, order_id)] = ctx.idempotency_key or ""
    return {"held": order_id}


async def release_order(ctx: ToolContext, order_id: str) -> dict[str, Any]:
    """The compensation of ``hold_order``."""
    _HOLDS.pop((ctx.tenant_id, order_id), None)
    return {"released": order_id}


async def notify_customer(ctx: ToolContext, order_id: str, message: str) -> dict[str, Any]:
    return {"notified": order_id, "message": message}
