"""Tools of the swarm tests (tests/support/swarms/): each records who called it with what."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from services.tools.context import ToolContext

CALLS: dict[str, list[dict[str, Any]]] = defaultdict(list)


def reset() -> None:
    CALLS.clear()


async def order_status(ctx: ToolContext, order_id: str = "") -> dict[str, Any]:
    CALLS["order_status"].append({"tenant": ctx.tenant_id, "order_id": order_id})
    return {"order_id": order_id, "status": "shipped", "tenant": ctx.tenant_id}


async def account_balance(ctx: ToolContext, **arguments: Any) -> dict[str, Any]:
    CALLS["account_balance"].append({"tenant": ctx.tenant_id, **arguments})
    return {"balance": 42, "tenant": ctx.tenant_id}
