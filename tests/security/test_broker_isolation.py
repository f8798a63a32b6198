"""Layer 1, the broker: a tenant connection reaches only its own subjects; each service role only
what it needs. Violations arrive asynchronously on the error callback (the server sends -ERR)."""

from __future__ import annotations

import pytest

from contracts import subjects
from contracts.registry import BUCKET as REGISTRY
from services.registry import SERVICES
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
        "$KV.TENANTS.acme",  # its own policy in the tenant registry
        "$JS.API.DIRECT.GET.KV_TENANTS.$KV.TENANTS.globex",  # another tenant's policy
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


def concrete(pattern: str) -> str:
    """A subject a pattern matches: the tenant ``acme``, other wildcards ``x``."""
    tokens = pattern.split(".")
    return ".".join(("acme" if i == 1 else "x") if t in ("*", ">") else t for i, t in enumerate(tokens))


def matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


APP_SERVICES = [manifest for manifest in SERVICES if manifest.in_app]
# What some service consumes: the subjects worth guarding. Each other role must be refused them.
CONSUMED = sorted({op.subject for manifest in SERVICES for op in manifest.consumes if manifest.in_app})


def denied(manifest) -> dict[str, list[str]]:
    """From the manifests: the consumed subjects this service may neither publish nor subscribe to."""
    permissions = manifest.permissions()
    publish = [concrete(s) for s in CONSUMED if not any(matches(p, concrete(s)) for p in permissions.publish)]
    subscribe = [s for s in CONSUMED if s not in permissions.subscribe]
    if subjects.ALL_EVENTS not in permissions.publish:
        publish.append("t.acme.events.x")
    # The tenant registry is read-only to every service: a compromised one cannot widen a policy.
    publish += [f"$KV.{REGISTRY}.acme", f"$JS.API.STREAM.PURGE.KV_{REGISTRY}", f"$JS.API.STREAM.DELETE.KV_{REGISTRY}"]
    return {"publish": publish, "subscribe": [*subscribe, "t.>", "_INBOX.acme.>"]}


ROLE_DENIED = {manifest.name: denied(manifest) for manifest in APP_SERVICES} | {
    "admin": {"publish": ["t.acme.router.request", "t.acme.events.x"], "subscribe": ["t.>", "_INBOX.acme.>"]},
}


def test_every_role_is_denied_something_consumed_elsewhere():
    for role, refused in ROLE_DENIED.items():
        assert refused["publish"] and refused["subscribe"], role


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


@pytest.mark.parametrize("manifest", APP_SERVICES, ids=lambda m: m.name)
async def test_the_service_roles_can_do_everything_their_manifest_declares(system, manifest):
    """The positive side: every subject a manifest declares is accepted (no violation before a flush)."""
    broker, _ = system
    role = manifest.name
    permissions = manifest.permissions()
    conn = await watched_connection(
        broker.url, user=role, password=broker.secrets.passwords[role], inbox_prefix=f"_INBOX._{role}".encode()
    )
    try:
        for subject in permissions.subscribe:
            await conn.nc.subscribe(subject, queue="probe")
        for pattern in (*(p.subject for p in manifest.publishes), *manifest.requests):
            await conn.nc.publish(concrete(pattern), b"{}")
        for other in manifest.watches:
            await conn.nc.publish(subjects.ping(other), b"")
        await conn.nc.flush()
        await conn.nc.flush()  # a -ERR would have arrived before the second PONG
        assert conn.errors == []
    finally:
        await conn.nc.close()
