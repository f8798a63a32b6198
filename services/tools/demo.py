"""The demo data tool: each tenant's orders, chosen by the tenant the runtime injects.

The query can never pick the tenant: the data folder comes from ``ctx.tenant_id`` only.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from contracts.tenants import validate_tenant_id
from services.runtime.settings import REPO_ROOT
from services.tools.context import ToolContext

ORDER_ID = re.compile(r"\b[A-Z]-\d{3,6}\b")


@lru_cache(maxsize=1024)
def _records(tenant: str, kind: str) -> tuple[dict[str, Any], ...]:
    """A tenant's records of one kind, read once (demo data does not change while it runs)."""
    folder = Path(os.environ.get("CORRAL_DEMO_DATA", REPO_ROOT / "deploy" / "demo" / "data"))
    path = folder / validate_tenant_id(tenant) / f"{kind}.json"
    if not path.exists():
        return ()
    return tuple(json.loads(path.read_text()))


async def lookup_orders(ctx: ToolContext, query: str) -> dict[str, Any]:
    """The order the query names (``A-1001``), else the most recent one, of the calling tenant."""
    return find_order(ctx.tenant_id, query)


def find_order(tenant: str, query: str) -> dict[str, Any]:
    """The lookup itself, also called in process by the LangGraph side of ``corral bench``."""
    orders = _records(tenant, "orders")
    mentioned = set(ORDER_ID.findall(query.upper()))
    named = [order for order in orders if order["id"] in mentioned]
    if not orders or (mentioned and not named):
        return {"found": False, "order": None, "order_count": len(orders)}
    chosen = named[0] if named else max(orders, key=lambda order: order["placed_at"])
    return {"found": True, "order": chosen, "order_count": len(orders)}


async def lookup_incidents(ctx: ToolContext, category: str | None = None) -> dict[str, Any]:
    """The calling tenant's open incidents, optionally of one category."""
    incidents = [
        incident
        for incident in _records(ctx.tenant_id, "incidents")
        if incident["status"] == "open" and (category is None or incident["category"] == category)
    ]
    titles = "; ".join(incident["title"] for incident in incidents) or "none"
    return {"open": len(incidents), "incidents": incidents, "summary": titles}
