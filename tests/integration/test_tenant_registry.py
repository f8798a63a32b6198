"""The tenant registry while the system runs: a tenant added, changed and removed by the operator
is served, limited and refused by the running services without a restart, each change is in the
tenant's audit trail, and a restarted service reads the registry back."""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest

from contracts.definitions import TenantPolicy
from contracts.errors import CorralError, Forbidden, RateLimited
from corral.audit_reader import read_trail
from corral.client import CorralClient
from corral.tenant_admin import Registry
from services.auth.tokens import mint_dev_token
from tests.support.services import running_services

WAIT_S = 10.0  # an upper bound: the change arrives in milliseconds (docs/operations.md)


@pytest.fixture
async def system(secured):
    async with running_services(secured.url, secured.state_dir, ("auth", "router", "graph", "tools")) as services:
        admin = await nats.connect(
            secured.url, user="admin", password=secured.secrets.passwords["admin"], inbox_prefix=b"_INBOX._admin"
        )
        try:
            yield secured, services, await Registry(admin, operator="ops").open()
        finally:
            await admin.close()


def like_acme(services, tenant: str, **changes) -> TenantPolicy:
    acme = services["router"].tenants.catalog.tenants["acme"]
    return TenantPolicy.model_validate({**json.loads(acme.model_dump_json()), "tenant": tenant, **changes})


async def ask(broker, tenant: str) -> str:
    client = await CorralClient.connect(
        broker.url, tenant=tenant, token=mint_dev_token(tenant, key=broker.secrets.dev_key)
    )
    try:
        return (await client.request("where is my order?", timeout=10)).output
    finally:
        await client.close()


async def eventually(check, what: str):
    """``check()`` until it stops raising a CorralError, within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return await check()
        except CorralError:
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {WAIT_S}s: {what}") from None
        await asyncio.sleep(0.02)  # polling a condition with a deadline


async def test_a_tenant_added_while_the_system_runs_is_served_without_a_restart(system):
    broker, services, registry = system
    with pytest.raises(Forbidden, match="no routing rules"):
        await ask(broker, "initech")
    await registry.add(like_acme(services, "initech"), services["router"].tenants.catalog)
    answer = await eventually(lambda: ask(broker, "initech"), "initech served")
    assert answer == "I could not find an order for you."  # its own (empty) data, never acme's
    for service in services.values():
        assert service.tenants is None or "initech" in service.tenants.catalog.tenants


async def test_a_changed_limit_holds_at_once_and_a_removed_tenant_is_refused(system):
    broker, services, registry = system
    catalog = services["router"].tenants.catalog
    await registry.add(like_acme(services, "initech"), catalog)
    await eventually(lambda: ask(broker, "initech"), "initech served")
    tight = like_acme(services, "initech", rate_limit={"per_second": 0.001, "burst": 1})
    await registry.update(tight, catalog)

    async def limited() -> None:
        for _ in range(3):  # the bucket holds one request at most now
            try:
                await ask(broker, "initech")
            except RateLimited:
                return
        raise CorralError("not limited yet")

    await eventually(limited, "the new rate limit applied")
    await registry.remove("initech")
    await eventually(lambda: _refused(broker, "initech"), "initech refused")
    trail = await read_trail(broker.url, "admin", broker.secrets.passwords["admin"], "initech")
    operator = [r for r in trail.records if r.service == "operator"]
    assert [r.action for r in operator] == ["tenant_added", "tenant_updated", "tenant_removed"]
    assert {r.principal for r in operator} == {"ops"} and not trail.problems


async def _refused(broker, tenant: str) -> None:
    try:
        await ask(broker, tenant)
    except Forbidden:
        return
    raise CorralError("still served")


async def test_a_removed_file_tenant_stays_removed_and_a_new_replica_reads_the_registry(system):
    broker, services, registry = system
    live = services["router"].tenants
    await registry.seed(live.catalog.with_tenants(live.files))  # what corral up does before the services start
    await registry.remove("globex")
    await eventually(lambda: _refused(broker, "globex"), "globex refused")
    # A replica started now (a restart, a scale-up) takes the registry over its files.
    async with running_services(broker.url, broker.state_dir, ("router",)) as fresh:
        assert "globex" not in fresh["router"].tenants.catalog.tenants
        assert "acme" in fresh["router"].tenants.catalog.tenants


async def test_the_operator_cannot_write_a_policy_the_deployment_cannot_serve(system):
    _, services, registry = system
    broken = like_acme(services, "initech", tools=["orders_lookup", "no_such_tool"])
    with pytest.raises(CorralError, match="unknown tool 'no_such_tool'"):
        await registry.add(broken, services["router"].tenants.catalog)
    assert await registry.get("initech") is None


async def test_the_auth_service_admits_by_the_registrys_connection_limits(system):
    broker, services, registry = system
    await registry.add(like_acme(services, "initech", connection={"max_connections": 1}), None)
    auth = services["auth"].tenants
    deadline = time.monotonic() + WAIT_S
    while "initech" not in auth.catalog.tenants:  # the auth service follows through its APP connection
        assert time.monotonic() < deadline, "the auth service did not take the new tenant"
        await asyncio.sleep(0.02)  # polling a condition with a deadline
    token = mint_dev_token("initech", key=broker.secrets.dev_key)
    first = await nats.connect(broker.url, token=token, inbox_prefix=b"_INBOX.initech", allow_reconnect=False)
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(
                broker.url, token=token, inbox_prefix=b"_INBOX.initech", allow_reconnect=False, connect_timeout=3
            )
    finally:
        await first.close()
