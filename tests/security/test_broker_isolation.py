"""Layer 1, the broker: a tenant connection reaches only its own subjects; each service role only
what it needs. Violations arrive asynchronously on the error callback (the server sends -ERR)."""

from __future__ import annotations

import pytest

from tests.security.conftest import tenant_connection, watched_connection

pytestmark = pytest.mark.usefixtures("system")


@pytest.mark.parametrize(
    "subject",
    [
        "t.globex.router.request",  # another tenant's front door
        "t.acme.graph.run",  # its own executor, bypassing the router's admission
        "t.acme.tool.orders_lookup.call",  # its own tools, bypassing graph and policy
        "t.acme.events.x",  # forging its own progress events
        "t.acme.audit.router",  # forging audit records
        "_INBOX.globex.x",  # another tenant's inbox
        "$SYS.REQ.USER.AUTH",  # the auth callout
    ],
)
async def test_a_tenant_cannot_publish_outside_its_two_subjects(system, subject):
    broker, _ = system
    acme = await tenant_connection(broker, "acme")
    try:
        await acme.nc.publish(subject, b"{}")
        assert f'publish to "{subject.lower()}"' in await acme.violation()
    finally:
        await acme.nc.close()


@pytest.mark.parametrize(
    "subject",
    [
        "t.>",
        "t.*.events.>",
        "t.globex.>",
        "t.globex.events.>",
        "_INBOX.>",
        "_INBOX.globex.>",
        "t.acme.router.request",
        ">",
    ],
)
async def test_a_tenant_cannot_subscribe_to_wildcards_or_other_tenants(system, subject):
    broker, _ = system
    acme = await tenant_connection(broker, "acme")
    try:
        await acme.nc.subscribe(subject)
        assert f'subscription to "{subject.lower()}"' in await acme.violation()
    finally:
        await acme.nc.close()


ROLE_DENIED = {
    "router": {
        "publish": ["t.acme.tool.orders_lookup.call", "t.acme.router.request"],
        "subscribe": ["t.*.tool.*.call", "t.*.graph.run"],
    },
    "graph": {
        "publish": ["t.acme.router.request", "t.acme.graph.run"],
        "subscribe": ["t.*.router.request", "t.*.tool.*.call"],
    },
    "tools": {
        "publish": ["t.acme.router.request", "t.acme.graph.run", "t.acme.tool.x.call"],
        "subscribe": ["t.*.graph.run", "t.*.router.request"],
    },
    "admin": {"publish": ["t.acme.router.request", "t.acme.events.x"], "subscribe": ["t.>", "_INBOX.acme.>"]},
}


@pytest.mark.parametrize("role", sorted(ROLE_DENIED))
async def test_each_service_role_is_refused_outside_its_set(system, role):
    broker, _ = system
    conn = await watched_connection(
        broker.url, user=role, password=broker.secrets.passwords[role], inbox_prefix=f"_INBOX._{role}".encode()
    )
    try:
        for subject in ROLE_DENIED[role]["publish"]:
            await conn.nc.publish(subject, b"{}")
            assert f'publish to "{subject.lower()}"' in await conn.violation()
        for subject in ROLE_DENIED[role]["subscribe"]:
            await conn.nc.subscribe(subject)
            assert f'subscription to "{subject.lower()}"' in await conn.violation()
    finally:
        await conn.nc.close()


async def test_the_service_roles_can_do_their_own_jobs(system):
    """The positive side: each role's own subjects are accepted (no violation before a flush)."""
    broker, _ = system
    for role, publish, subscribe in (
        ("router", "t.acme.graph.run", "t.*.router.request"),
        ("graph", "t.acme.tool.orders_lookup.call", "t.*.graph.run"),
        ("tools", "t.acme.events.x", "t.*.tool.*.call"),
    ):
        conn = await watched_connection(
            broker.url, user=role, password=broker.secrets.passwords[role], inbox_prefix=f"_INBOX._{role}".encode()
        )
        try:
            await conn.nc.subscribe(subscribe, queue="probe")
            await conn.nc.publish(publish, b"{}")
            await conn.nc.flush()
            await conn.nc.flush()  # a -ERR would have arrived before the second PONG
            assert conn.errors == []
        finally:
            await conn.nc.close()
