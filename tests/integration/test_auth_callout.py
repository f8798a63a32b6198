"""The auth service against a real, production-configured nats-server: a tenant's token becomes a
connection scoped to that tenant's subjects, and every bad token is refused at connect.

Only the auth service runs here; a raw ``router`` service-user connection stands in for the other
side of the tenant's subjects. Permission violations arrive asynchronously (the server sends
``-ERR``), so tests wait on the error callback with a timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jwt
import nats
import pytest
import structlog
from nats.aio.client import Client
from structlog.testing import CapturingLogger

from contracts import subjects
from services.auth.__main__ import build
from services.auth.tokens import DEV_AUDIENCE, DEV_ISSUER, mint_dev_token
from services.runtime.service import Service
from services.runtime.settings import Settings
from tests.support.brokers import SecuredBroker

WAIT_S = 5.0  # upper bound of any wait; a passing test never waits this long


async def settled(nc: Client) -> None:
    """Return once the server has processed everything sent on ``nc`` so far.

    nats-py 2.16 writes a flush's PING straight to the socket, ahead of the SUB and PUB commands
    still queued for its flusher task, so a single ``flush()`` can return before the server has
    seen a subscription (measured: about 3 % of fresh subscriptions). The first round trip lets the
    flusher write the queue; the second PING then follows it on the wire.
    """
    await nc.flush()
    await nc.flush()


@pytest.fixture
def auth_log() -> CapturingLogger:
    """What the auth service logs, as calls with their fields."""
    return CapturingLogger()


@pytest.fixture
async def auth(secured: SecuredBroker, auth_log: CapturingLogger) -> AsyncIterator[Service]:
    """The auth service, built by its own wiring, running in this event loop.

    Its log goes to ``auth_log``: the process-wide structlog setup prints to the ``sys.stderr``
    of the moment, which pytest closes after fixture setup.
    """
    service = build(Settings(nats_url=secured.url, state_dir=secured.state_dir, log_level="warning"))
    service.log = structlog.wrap_logger(auth_log, processors=[]).bind(service="auth")
    await service.start()
    await settled(service.nc)  # the callout subscription is in place before anyone connects
    yield service
    await service.stop()


@dataclass
class Tenant:
    """A tenant connection whose asynchronous errors can be awaited."""

    nc: Client
    errors: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def next_error(self) -> str:
        return (await asyncio.wait_for(self.errors.get(), WAIT_S)).lower()


async def connect_tenant(broker: SecuredBroker, token: str, tenant: str = "acme") -> Tenant:
    errors: asyncio.Queue[str] = asyncio.Queue()
    closed = asyncio.Event()

    async def on_error(error: Exception) -> None:
        errors.put_nowait(str(error))

    async def on_closed() -> None:
        closed.set()

    nc = await nats.connect(
        broker.url,
        token=token,
        inbox_prefix=subjects.inbox_prefix(tenant).encode(),
        error_cb=on_error,
        closed_cb=on_closed,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=3,
    )
    return Tenant(nc, errors, closed)


async def connect_router(broker: SecuredBroker) -> Client:
    """The router's service user: subscribes to every tenant's requests, publishes events."""
    return await nats.connect(
        broker.url,
        user="router",
        password=broker.secrets.passwords["router"],
        inbox_prefix=subjects.service_inbox_prefix("router").encode(),
        allow_reconnect=False,
    )


def dev_token(broker: SecuredBroker, *, key: str | None = None, **changes: object) -> str:
    """A development token with some claims changed (``None`` removes a claim)."""
    now = int(time.time())
    claims = {"iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": "alice", "tenant_id": "acme", "iat": now, "exp": now + 300}
    claims.update(changes)
    kept = {name: value for name, value in claims.items() if value is not None}
    return jwt.encode(kept, key or broker.secrets.dev_key, algorithm="HS256")


async def assert_refused(broker: SecuredBroker, token: str, auth_log: CapturingLogger) -> str:
    """Connecting with ``token`` fails, and the reason the auth service denied it."""
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        tenant = await connect_tenant(broker, token)
        await tenant.nc.close()
    # The denial came from the responder (not from the server timing it out): it says why.
    denials = [call.kwargs for call in auth_log.calls if call.kwargs.get("event") == "auth_denied"]
    assert denials, "the auth service logged no denial"
    return denials[-1]["reason"]


@pytest.fixture
async def acme(secured: SecuredBroker, auth: Service) -> AsyncIterator[Tenant]:
    tenant = await connect_tenant(secured, mint_dev_token("acme", key=secured.secrets.dev_key, sub="alice"))
    yield tenant
    await tenant.nc.close()


@pytest.fixture
async def router(secured: SecuredBroker, auth: Service) -> AsyncIterator[Client]:
    nc = await connect_router(secured)
    yield nc
    await nc.close()


async def test_a_tenant_with_a_dev_token_reaches_its_router_subject(acme: Tenant, router: Client) -> None:
    inbox = await router.subscribe(subjects.ROUTER_REQUESTS)
    await settled(router)
    await acme.nc.publish(subjects.router_request("acme", "alice"), b"hello")
    message = await inbox.next_msg(timeout=WAIT_S)
    assert (message.subject, message.data) == (subjects.router_request("acme", "alice"), b"hello")


async def test_a_tenant_receives_its_own_run_events(acme: Tenant, router: Client) -> None:
    events = await acme.nc.subscribe(subjects.tenant_events("acme"))
    await settled(acme.nc)
    await router.publish(subjects.events("acme", "alice", "run-1"), b"progress")
    message = await events.next_msg(timeout=WAIT_S)
    assert (message.subject, message.data) == (subjects.events("acme", "alice", "run-1"), b"progress")


async def test_publishing_to_another_tenant_is_a_violation_and_never_delivered(acme: Tenant, router: Client) -> None:
    inbox = await router.subscribe(subjects.ROUTER_REQUESTS)
    await settled(router)
    await acme.nc.publish(subjects.router_request("globex", "alice"), b"trespass")
    assert f'publish to "{subjects.router_request("globex", "alice")}"' in await acme.next_error()
    # The server keeps one publisher's order: had the trespass been delivered, it would come first.
    await acme.nc.publish(subjects.router_request("acme", "alice"), b"marker")
    first = await inbox.next_msg(timeout=WAIT_S)
    assert (first.subject, first.data) == (subjects.router_request("acme", "alice"), b"marker")


async def test_a_tenant_cannot_publish_as_another_principal_of_its_own_tenant(acme: Tenant, router: Client) -> None:
    """The subject names the principal, and the broker lets a connection use only its own: a
    service reads who asked from the subject, never from what an envelope claims."""
    await acme.nc.publish(subjects.router_request("acme", "admin"), b"impersonation")
    assert f'publish to "{subjects.router_request("acme", "admin")}"' in await acme.next_error()


@pytest.mark.parametrize("subject", ["t.globex.>", "t.>"])
async def test_subscribing_beyond_the_tenant_is_a_violation(acme: Tenant, subject: str) -> None:
    await acme.nc.subscribe(subject)
    assert f'subscription to "{subject}"' in await acme.next_error()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        pytest.param({"exp": int(time.time()) - 600}, "expired", id="expired"),
        pytest.param({"nbf": int(time.time()) + 600}, "not yet valid", id="not-yet-valid"),
        pytest.param({"key": "not-the-development-key-0123456789abcdef"}, "bad signature", id="wrong-signature"),
        pytest.param({"tenant_id": "*"}, "not a valid tenant id", id="tenant-star"),
        pytest.param({"tenant_id": ">"}, "not a valid tenant id", id="tenant-gt"),
        pytest.param({"tenant_id": "acme.globex"}, "not a valid tenant id", id="tenant-with-a-dot"),
        pytest.param({"tenant_id": None}, "no 'tenant_id' claim", id="no-tenant"),
        pytest.param({"iss": "https://elsewhere"}, "issuer", id="wrong-issuer"),
    ],
)
async def test_a_bad_token_is_denied_at_connect_with_a_reason(
    secured: SecuredBroker, auth: Service, auth_log: CapturingLogger, changes: dict, reason: str
) -> None:
    assert reason in await assert_refused(secured, dev_token(secured, **changes), auth_log)


@pytest.mark.parametrize(("token", "reason"), [("", "no token"), ("not-a-jwt", "malformed token")])
async def test_a_missing_or_malformed_token_is_denied_at_connect(
    secured: SecuredBroker, auth: Service, auth_log: CapturingLogger, token: str, reason: str
) -> None:
    assert reason in await assert_refused(secured, token, auth_log)


async def test_the_auth_service_keeps_serving_after_denials(
    secured: SecuredBroker, auth: Service, auth_log: CapturingLogger
) -> None:
    for tenant_claim in ("*", ">", "ACME"):
        await assert_refused(secured, dev_token(secured, tenant_id=tenant_claim), auth_log)
    tenant = await connect_tenant(secured, mint_dev_token("acme", key=secured.secrets.dev_key))
    try:
        assert tenant.nc.is_connected
    finally:
        await tenant.nc.close()


async def test_a_denial_is_logged_with_its_reason_but_not_the_token(
    secured: SecuredBroker, auth: Service, auth_log: CapturingLogger
) -> None:
    token = dev_token(secured, tenant_id="*")
    assert "not a valid tenant id" in await assert_refused(secured, token, auth_log)
    logged = repr([call.kwargs for call in auth_log.calls])
    assert token not in logged and token.split(".")[2] not in logged


async def test_the_broker_disconnects_a_tenant_when_its_token_expires(secured: SecuredBroker, auth: Service) -> None:
    # The user JWT carries the token's exp, so the server itself ends the session then (nats-py
    # reports no error for it: the connection just closes, and reconnecting is off here).
    tenant = await connect_tenant(secured, mint_dev_token("acme", key=secured.secrets.dev_key, ttl_s=2))
    try:
        assert tenant.nc.is_connected
        await asyncio.wait_for(tenant.closed.wait(), WAIT_S)
    finally:
        await tenant.nc.close()
