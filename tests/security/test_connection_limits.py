"""Connection limits: each tenant's, from its policy, travel in the user JWT the auth service
issues; the broker-wide cap on subscriptions per connection is what nats-server enforces on
tenants today (it does not apply a callout-issued user's own limits, nats-server issue 5002).
Connections per tenant are counted and refused by the auth service."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import structlog
import yaml
from structlog.testing import CapturingLogger

from contracts import subjects
from contracts.definitions import ConnectionLimits
from corral.audit_reader import read_trail
from corral.nats_server import NatsServer, free_port
from corral.state import MAX_SUBSCRIPTIONS_PER_CONNECTION, init_state
from services.auth.__main__ import build
from services.auth.callout import CalloutSigner, decode_request
from services.auth.tokens import Identity, mint_dev_token
from services.runtime.settings import Settings
from tests.security.conftest import still_serving, watched_connection
from tests.support.brokers import SecuredBroker
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


# ---- connections per tenant ---------------------------------------------------------------
# The auth service counts each tenant's open connections from the broker's system-account events
# and refuses one past its policy's connection.max_connections (services/auth/connections.py).

LIMIT = 3
FEW_SUBSCRIPTIONS = 4
WAIT_S = 5.0  # upper bound of any wait; shorter than a grant's lifetime, so a missed event fails


@pytest.fixture
def definitions(tmp_path: Path) -> Path:
    """A tenant allowed three connections; every other tenant gets the default limit."""
    folder = tmp_path / "definitions"
    folder.mkdir()
    tenants = {
        "tenants": [
            {"tenant": "capped", "connection": {"max_connections": LIMIT}},
            {"tenant": "fewsubs", "connection": {"max_subscriptions": FEW_SUBSCRIPTIONS}},
        ]
    }
    (folder / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    return folder


@contextlib.asynccontextmanager
async def auth_replica(broker: SecuredBroker, definitions: Path, log: CapturingLogger | None = None):
    """One replica of the auth service, built by its own wiring, in this event loop."""
    service = build(
        Settings(nats_url=broker.url, state_dir=broker.state_dir, definitions=definitions, log_level="warning")
    )
    if log is not None:
        service.log = structlog.wrap_logger(log, processors=[]).bind(service="auth")
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def connections() -> AsyncIterator[list[nats.NATS]]:
    """Tenant connections a test opens; every one is closed afterwards."""
    opened: list[nats.NATS] = []
    yield opened
    for nc in opened:
        await nc.close()


async def connect(broker: SecuredBroker, tenant: str, opened: list[nats.NATS], **options) -> nats.NATS:
    nc = await nats.connect(
        broker.url,
        token=mint_dev_token(tenant, key=broker.secrets.dev_key),
        inbox_prefix=subjects.inbox_prefix(tenant).encode(),
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=3,
        **options,
    )
    opened.append(nc)
    return nc


async def refused(broker: SecuredBroker, tenant: str, opened: list[nats.NATS]) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await connect(broker, tenant, opened)


async def admitted_within(broker: SecuredBroker, tenant: str, opened: list[nats.NATS]) -> nats.NATS:
    """Connect once the auth service has seen a slot free, polling with a deadline."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return await connect(broker, tenant, opened)
        except nats.errors.Error as error:
            if "Authorization Violation" not in str(error) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.02)  # polling a condition with a deadline, not synchronising on time


async def eventually(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT_S}s: {what}"
        await asyncio.sleep(0.01)  # polling with a deadline


def callout_errors(service, tenant: str) -> dict[str, int]:
    (endpoint,) = service.stats.snapshot()["endpoints"]
    return (endpoint.get("tenants", {}).get(tenant) or {}).get("errors") or {}


async def test_a_tenant_past_its_connection_limit_is_refused_while_other_tenants_connect(
    secured, definitions, connections
):
    log = CapturingLogger()
    async with auth_replica(secured, definitions, log) as auth:
        for _ in range(LIMIT):
            await connect(secured, "capped", connections)
        await refused(secured, "capped", connections)
        await connect(secured, "globex", connections)  # its own count, the default limit
        denials = [call.kwargs for call in log.calls if call.kwargs.get("event") == "auth_denied"]
        assert [(d["tenant_id"], d["reason"].split(":")[0]) for d in denials] == [("capped", "connection_limit")]
        await eventually(lambda: callout_errors(auth, "capped") == {"limit_exceeded": 1}, "the refusal counted")


async def test_closing_a_connection_lets_the_next_one_in(secured, definitions, connections):
    async with auth_replica(secured, definitions):
        first, *_ = [await connect(secured, "capped", connections) for _ in range(LIMIT)]
        await refused(secured, "capped", connections)
        await first.close()
        await admitted_within(secured, "capped", connections)
        await refused(secured, "capped", connections)  # and the count is at the limit again


async def test_a_restarted_auth_service_counts_the_connections_already_open(secured, definitions, connections):
    async with auth_replica(secured, definitions):
        opened = [await connect(secured, "capped", connections) for _ in range(LIMIT)]
    # Tenants' connections outlive the auth service; a new replica lists them from the broker.
    async with auth_replica(secured, definitions):
        await refused(secured, "capped", connections)
        await opened[0].close()
        await admitted_within(secured, "capped", connections)  # and it follows the events from there


async def test_a_restarted_auth_service_lists_every_page_of_the_brokers_connections(
    secured, definitions, connections, monkeypatch
):
    from services.auth import broker_connections

    monkeypatch.setattr(broker_connections, "PAGE", 4)  # 20 connections: several pages
    monkeypatch.setattr(broker_connections, "OVERLAP", 1)
    async with auth_replica(secured, definitions):
        others = [await connect(secured, "globex", connections) for _ in range(17)]
        for _ in range(LIMIT):  # the highest client ids: on the last page
            await connect(secured, "capped", connections)
    for nc in others[:5]:  # closed while no auth service watches
        await nc.close()
    async with auth_replica(secured, definitions):
        await refused(secured, "capped", connections)


async def test_after_a_broker_restart_the_old_brokers_connections_no_longer_count(tmp_path, definitions, connections):
    """Every connection went with the old broker: the tenant gets its whole limit again."""
    state = tmp_path / "state"
    port = free_port()
    secrets = init_state(state, port=port)
    server = NatsServer(config=state / "nats.conf", port=port, log_file=state / "nats.log")
    broker = SecuredBroker(server.url, state, secrets)
    with server:
        async with auth_replica(broker, definitions):
            for _ in range(LIMIT):
                await connect(broker, "capped", connections)
            server.stop()
            server.start()
            await admitted_within(broker, "capped", connections)  # once the auth service is back
            for _ in range(LIMIT - 1):
                await connect(broker, "capped", connections)
            await refused(broker, "capped", connections)


async def test_two_auth_replicas_leave_a_tenant_no_more_than_its_limit(secured, definitions, connections):
    """Replicas admitting at the same moment can both let the tenant in; the one whose connection
    arrives past the limit closes it, so what stays open is the limit."""
    async with auth_replica(secured, definitions), auth_replica(secured, definitions):
        attempts = await asyncio.gather(
            *(connect(secured, "capped", connections) for _ in range(3 * LIMIT)), return_exceptions=True
        )
        admitted = [nc for nc in attempts if isinstance(nc, nats.NATS)]
        assert LIMIT <= len(admitted) <= 2 * LIMIT
        assert all("Authorization Violation" in str(e) for e in attempts if not isinstance(e, nats.NATS))
        await eventually(lambda: sum(not nc.is_closed for nc in admitted) == LIMIT, "the excess closed")
        await refused(secured, "capped", connections)


async def test_the_broker_applies_none_of_a_callout_users_own_jwt_limits(secured, definitions, connections):
    """nats-server 2.15 ignores the limits in a callout-issued user JWT (nats-server issue 5002):
    the connection gets the server's payload limit, not the tenant's. When this fails, the broker
    has started applying them: update docs/security.md and corral/state.py's comment."""
    async with auth_replica(secured, definitions):
        nc = await connect(secured, "capped", connections)
        assert nc.max_payload == 1024 * 1024 != ConnectionLimits().max_payload_bytes


async def test_a_tenant_connection_past_its_subscription_limit_is_closed_by_the_auth_service(
    secured, definitions, connections, monkeypatch
):
    """The broker ignores the JWT's ``subs`` (above), so the auth service sweeps APP's connections
    by subscriptions: a connection past its tenant's limit is closed, logged and audited; one at
    its limit, and another tenant's with as many under the default limit, stay open."""
    monkeypatch.setenv("CORRAL_AUTH_SUBSCRIPTIONS_CHECK_S", "0.1")
    async with auth_replica(secured, definitions):
        at_limit = await connect(secured, "fewsubs", connections)
        over = await connect(secured, "fewsubs", connections)
        other = await connect(secured, "globex", connections)
        for n in range(FEW_SUBSCRIPTIONS):
            await at_limit.subscribe(f"t.fewsubs.events.dev.run{n}")
            await other.subscribe(f"t.globex.events.dev.run{n}")
        for n in range(FEW_SUBSCRIPTIONS + 2):
            await other.subscribe(f"t.globex.events.dev.more{n}")
            await over.subscribe(f"t.fewsubs.events.dev.run{n}")
        for nc in (at_limit, over, other):
            await nc.flush()
        await eventually(lambda: over.is_closed, "the connection past its limit closed")
        records: list = []
        deadline = time.monotonic() + WAIT_S
        while not records:  # the audit record is written in the background: poll with a deadline
            assert time.monotonic() < deadline, "no audit record of the closed connection"
            trail = await read_trail(secured.url, "admin", secured.secrets.passwords["admin"], "fewsubs")
            records = [r for r in trail.records if r.action == "auth_denied"]
            await asyncio.sleep(0.05)
        (record,) = records
        assert record.detail["reason"].startswith(
            f"subscription_limit: closed a connection holding {FEW_SUBSCRIPTIONS + 2}"
        )
        await at_limit.flush(timeout=WAIT_S)  # both still served
        await other.flush(timeout=WAIT_S)
        assert not at_limit.is_closed and not other.is_closed
        assert not (await read_trail(secured.url, "admin", secured.secrets.passwords["admin"], "globex")).records


SYSTEM_USER = "auth-system"


async def test_the_auth_services_system_user_may_only_follow_apps_connections(secured):
    """Least privilege in the system account: APP's connect and disconnect events, APP's listing,
    closing a connection; no other account, no server-wide request, no reload, no callout."""
    conn = await watched_connection(
        secured.url,
        user=SYSTEM_USER,
        password=secured.secrets.passwords[SYSTEM_USER],
        inbox_prefix=subjects.service_inbox_prefix(SYSTEM_USER).encode(),
    )
    try:
        for subject in ("$SYS.>", "$SYS.ACCOUNT.AUTH.CONNECT", "$SYS.ACCOUNT.*.DISCONNECT", "$SYS.SERVER.>", ">"):
            await conn.nc.subscribe(subject)
            assert f'subscription to "{subject.lower()}"' in await conn.violation()
        for subject in (
            "$SYS.REQ.SERVER.PING.CONNZ",
            "$SYS.REQ.ACCOUNT.AUTH.CONNZ",
            "$SYS.REQ.ACCOUNT.APP.SUBSZ",
            "$SYS.REQ.SERVER.x.RELOAD",
            "$SYS.REQ.USER.AUTH",
        ):
            await conn.nc.publish(subject, b"{}")
            assert f'publish to "{subject.lower()}"' in await conn.violation()
        violations = len(conn.errors)
        await conn.nc.subscribe("$SYS.ACCOUNT.APP.CONNECT")
        await conn.nc.subscribe("$SYS.ACCOUNT.APP.DISCONNECT")
        listing = json.loads((await conn.nc.request("$SYS.REQ.ACCOUNT.APP.CONNZ", b"{}", timeout=WAIT_S)).data)
        server = listing["server"]["id"]
        kick = json.loads((await conn.nc.request(f"$SYS.REQ.SERVER.{server}.KICK", b'{"cid":0}', timeout=WAIT_S)).data)
        assert "no such client" in kick["error"]["description"]
        await conn.nc.flush()
        await conn.nc.flush()  # a -ERR would have arrived before the second PONG
        assert len(conn.errors) == violations
    finally:
        await conn.nc.close()
