"""A tenant connection outlives its token when the client has a token provider, over a real broker.

The auth service gives the connection's NATS user the token's expiry, so the server cuts the
connection when the token expires; the client then comes back with a fresh token from its provider.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from contracts.errors import DeadlineExceeded, Unavailable
from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from tests.support.services import running_services

ALL = ("auth", "router", "graph", "tools")
DEADLINE_S = 10.0


@pytest.fixture
async def system(secured):
    async with running_services(secured.url, secured.state_dir, ALL):
        yield secured


def provider_of(broker, calls: list[str], *, asynchronous: bool):
    """A token provider minting fresh 60 s tokens for acme, sync or async, recording each call."""

    def mint() -> str:
        calls.append("minted")
        return mint_dev_token("acme", key=broker.secrets.dev_key, ttl_s=60)

    async def mint_async() -> str:
        await asyncio.sleep(0)  # a real async provider would ask an identity provider here
        return mint()

    return mint_async if asynchronous else mint


def watcher() -> tuple[dict[str, asyncio.Event], dict[str, object]]:
    """Events set from the client's nats callbacks (passed through ``connect``'s options)."""
    events = {name: asyncio.Event() for name in ("disconnected", "reconnected", "closed")}

    def setter(name):
        async def callback():
            events[name].set()

        return callback

    return events, {f"{name}_cb": setter(name) for name in events}


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync-provider", "async-provider"])
async def test_the_client_reconnects_with_a_fresh_token_when_its_token_expires(system, asynchronous):
    broker = system
    calls: list[str] = []
    events, callbacks = watcher()
    client = await CorralClient.connect(
        broker.url,
        tenant="acme",
        token=mint_dev_token("acme", key=broker.secrets.dev_key, ttl_s=2),
        token_provider=provider_of(broker, calls, asynchronous=asynchronous),
        **callbacks,
    )
    try:
        # The server cuts the connection when the 2 s token expires; the client comes back.
        await asyncio.wait_for(events["reconnected"].wait(), timeout=DEADLINE_S)
        assert events["disconnected"].is_set() and client.renewed.is_set()
        result = await client.request("where is my order?", timeout=10)
        assert not events["closed"].is_set()  # the caller never saw the client give up
    finally:
        await client.close()
    assert result.output.startswith("Order A-")
    assert calls, "the provider was asked for a fresh token"


async def test_a_reconnect_sends_the_fresh_token_in_connect(system):
    """nats-py's own reconnect (a dropped connection) sends the provider's token, not the first one."""
    broker = system
    calls: list[str] = []
    events, callbacks = watcher()
    first = mint_dev_token("acme", key=broker.secrets.dev_key, ttl_s=2)
    expires_at = time.time() + 2
    client = await CorralClient.connect(
        broker.url,
        tenant="acme",
        token=first,
        token_provider=provider_of(broker, calls, asynchronous=False),
        **callbacks,
    )
    try:
        await client.nc.force_reconnect()
        await asyncio.wait_for(events["reconnected"].wait(), timeout=DEADLINE_S)
        assert calls == ["minted"]
        assert client.nc.options["token"] == client.token != first
        events["disconnected"].clear()
        # Had the reconnect used the first token, the server would cut this connection at its
        # expiry; with the fresh one it stays up past it (a bounded wait for something not to happen).
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(events["disconnected"].wait(), timeout=expires_at + 2.5 - time.time())
        result = await client.request("where is my order?", timeout=10)
    finally:
        await client.close()
    assert result.output.startswith("Order A-")


async def test_without_a_token_provider_an_expired_client_stays_disconnected(system):
    broker = system
    events, callbacks = watcher()
    client = await CorralClient.connect(
        broker.url, tenant="acme", token=mint_dev_token("acme", key=broker.secrets.dev_key, ttl_s=2), **callbacks
    )
    try:
        await asyncio.wait_for(events["closed"].wait(), timeout=DEADLINE_S)
        started = time.monotonic()
        with pytest.raises((Unavailable, DeadlineExceeded)):
            await client.request("where is my order?", timeout=2)
        assert time.monotonic() - started < 5
    finally:
        await client.close()
    assert not events["reconnected"].is_set() and not client.renewed.is_set()


async def test_a_failing_token_provider_leaves_the_client_closed_not_crashed(system):
    broker = system
    events, callbacks = watcher()

    def broken() -> str:
        raise RuntimeError("identity provider unreachable")

    client = await CorralClient.connect(
        broker.url,
        tenant="acme",
        token=mint_dev_token("acme", key=broker.secrets.dev_key, ttl_s=2),
        token_provider=broken,
        **callbacks,
    )
    try:
        await asyncio.wait_for(events["closed"].wait(), timeout=DEADLINE_S)
        with pytest.raises(Unavailable, match="not connected"):
            await client.request("where is my order?", timeout=2)
    finally:
        await client.close()
    assert any(isinstance(error, RuntimeError) for error in client.errors)
    assert not client.renewed.is_set()
