"""Fixtures for the adversarial suite: a production-configured broker with every service running."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import nats
import pytest

from contracts import subjects
from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from tests.support.services import running_services


@pytest.fixture
async def system(secured):
    async with running_services(secured.url, secured.state_dir, ("auth", "router", "graph", "tools")) as services:
        yield secured, services


@dataclass
class Watched:
    """A raw connection whose asynchronous permission errors can be awaited."""

    nc: nats.NATS
    errors: list[str] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def violation(self, timeout: float = 5.0) -> str:
        await asyncio.wait_for(self.arrived.wait(), timeout)
        self.arrived.clear()
        return self.errors[-1].lower()


async def watched_connection(url: str, **options) -> Watched:
    watched = Watched(nc=None)  # type: ignore[arg-type]

    async def on_error(error: Exception) -> None:
        watched.errors.append(str(error))
        watched.arrived.set()

    watched.nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, **options)
    return watched


async def tenant_connection(broker, tenant: str) -> Watched:
    return await watched_connection(
        broker.url,
        token=mint_dev_token(tenant, key=broker.secrets.dev_key),
        inbox_prefix=subjects.inbox_prefix(tenant).encode(),
    )


async def still_serving(broker, tenant: str = "acme") -> None:
    """The system answers a normal request: whatever was attempted before did not break it."""
    client = await CorralClient.connect(
        broker.url, tenant=tenant, token=mint_dev_token(tenant, key=broker.secrets.dev_key)
    )
    try:
        result = await client.request("where is my order?", timeout=10)
    finally:
        await client.close()
    assert result.output.startswith("Order A-" if tenant == "acme" else "Order G-")
