"""Tools of the swarm tests (tests/support/swarms/): each records who called it with what."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from services.toolkit.context import ToolContext
from tests.support.services import running_services

DEFINITIONS = Path(__file__).resolve().parent / "swarms"

CALLS: dict[str, list[dict[str, Any]]] = defaultdict(list)


# A tool that holds its turn until the test lets it go (the services run in the test's loop).
ENTERED = asyncio.Event()
RELEASE = asyncio.Event()


def reset() -> None:
    global ENTERED, RELEASE
    CALLS.clear()
    ENTERED, RELEASE = asyncio.Event(), asyncio.Event()  # each test runs in a loop of its own


async def hold(ctx: ToolContext) -> dict[str, Any]:
    ENTERED.set()
    await RELEASE.wait()
    return {"held": "done"}


async def order_status(ctx: ToolContext, order_id: str = "") -> dict[str, Any]:
    CALLS["order_status"].append({"tenant": ctx.tenant_id, "order_id": order_id})
    return {"order_id": order_id, "status": "shipped", "tenant": ctx.tenant_id}


async def account_balance(ctx: ToolContext, **arguments: Any) -> dict[str, Any]:
    CALLS["account_balance"].append({"tenant": ctx.tenant_id, **arguments})
    return {"balance": 42, "tenant": ctx.tenant_id}


@contextlib.asynccontextmanager
async def swarm_system(broker: Any) -> AsyncIterator[dict[str, Any]]:
    """The services a conversation of tests/support/swarms/ needs, on ``broker``."""
    reset()
    names = ("auth", "router", "tools", "graph", "swarm")
    async with running_services(broker.url, broker.state_dir, names, definitions=DEFINITIONS) as services:
        yield services


async def client_for(broker: Any, tenant: str = "acme", sub: str = "dev") -> CorralClient:
    token = mint_dev_token(tenant, key=broker.secrets.dev_key, sub=sub)
    return await CorralClient.connect(broker.url, tenant=tenant, token=token)
