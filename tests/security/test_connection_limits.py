"""Connection limits: each tenant's, from its policy, travel in the user JWT the auth service
issues; the broker-wide cap on subscriptions per connection is what nats-server enforces on
tenants today (it does not apply a callout-issued user's own limits, nats-server issue 5002)."""

from __future__ import annotations

import base64
import json
import time

from contracts.definitions import ConnectionLimits
from corral.state import MAX_SUBSCRIPTIONS_PER_CONNECTION
from services.auth.callout import CalloutSigner, decode_request
from services.auth.tokens import Identity, mint_dev_token
from tests.security.conftest import still_serving, watched_connection
from tests.unit.test_auth_callout import ISSUER, server_request


def claims_of(jwt: str) -> dict:
    body = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def test_the_user_jwt_carries_the_tenants_connection_limits():
    signer = CalloutSigner(ISSUER.seed.decode())
    identity = Identity(tenant="acme", subject="alice", expires_at=int(time.time()) + 60)
    limits = ConnectionLimits(max_subscriptions=3, max_payload_bytes=2048)
    user = claims_of(signer.user_jwt(decode_request(server_request()), identity, int(time.time()), limits))
    assert (user["nats"]["subs"], user["nats"]["payload"]) == (3, 2048)
    defaults = claims_of(signer.user_jwt(decode_request(server_request()), identity, int(time.time())))
    assert defaults["nats"]["subs"] == ConnectionLimits().max_subscriptions  # never unlimited


async def test_the_broker_cuts_off_a_tenant_connection_past_the_subscription_cap(system):
    """Past the cap the broker closes the tenant's connection (and logs why; no error reaches the
    client first); other tenants are untouched."""
    import asyncio
    import contextlib

    import nats

    broker, _ = system
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    acme = await watched_connection(
        broker.url,
        token=mint_dev_token("acme", key=broker.secrets.dev_key),
        inbox_prefix=b"_INBOX.acme",
        closed_cb=on_closed,
    )
    try:
        for n in range(MAX_SUBSCRIPTIONS_PER_CONNECTION):
            await acme.nc.subscribe(f"t.acme.events.run{n}")
        await acme.nc.flush()
        assert not closed.is_set()  # up to the cap is fine
        await acme.nc.subscribe("t.acme.events.one-too-many")
        with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.TimeoutError):
            await acme.nc.flush()
        await asyncio.wait_for(closed.wait(), 10)
    finally:
        await acme.nc.close()
    assert "maximum subscriptions exceeded" in (broker.state_dir / "nats.log").read_text()
    await still_serving(broker, "globex")
