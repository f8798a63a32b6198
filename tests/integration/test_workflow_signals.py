"""Signals sent before the run reaches their wait, over a real broker configured as in
production: kept in the run's history and taken when the run gets there, with the wait's scope
checked when the signal is sent; a signal no wait ahead takes is refused."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import nats
import pytest

from contracts.definitions import TenantPolicy
from contracts.errors import Conflict, Forbidden, LimitExceeded
from corral.client import CorralClient
from corral.tenant_admin import Registry
from services.auth.tokens import mint_dev_token
from tests.support.services import running_services
from tests.support.workflow_tools import waitfor_status

DEFINITIONS = Path(__file__).resolve().parent.parent / "support" / "workflows"


@pytest.fixture
async def broker(secured):
    async with running_services(secured.url, secured.state_dir, ("auth", "router", "tools", "workflow"), DEFINITIONS):
        yield secured


async def client_for(broker, sub, scopes=()):
    token = mint_dev_token("acme", key=broker.secrets.dev_key, sub=sub, scopes=tuple(scopes))
    return await CorralClient.connect(broker.url, tenant="acme", token=token)


async def test_a_signal_sent_before_its_wait_is_kept_and_taken_when_the_run_gets_there(broker):
    clerk = await client_for(broker, "clerk")
    manager = await client_for(broker, "manager", scopes=["refund:approve"])
    try:
        waiting = await clerk.request(target="two_approvals", input={})
        assert waiting.output["waiting_for"] == "first"
        run_id = waiting.run_id
        # The wait ahead needs a scope: checked now, not when the run gets there.
        with pytest.raises(Forbidden, match="refund:approve"):
            await clerk.signal(run_id, "second", {"amount": 1})
        with pytest.raises(Conflict, match="no wait ahead for signal 'nope'"):
            await clerk.signal(run_id, "nope")
        early = await manager.signal(run_id, "second", {"amount": 7}, scope="refund:approve")
        assert early["accepted"] is True and early["buffered"] is True
        answer = await clerk.signal(run_id, "first")
        assert answer.get("buffered") is None
        shown = await waitfor_status(clerk, run_id, "completed")
    finally:
        await clerk.close()
        await manager.close()
    assert shown["run"]["status"] == "completed"
    types = [event["type"] for event in shown["events"]]
    assert "waiting" in types and types.count("signal_buffered") == 1
    taken = [e for e in shown["events"] if e["type"] == "signal_received" and e["step"] == "second"]
    assert len(taken) == 1 and taken[0]["by"] == "manager" and taken[0]["data"] == {"amount": 7}
    # The run never waited at `second`: the kept signal was taken as it got there.
    assert not any(e["type"] == "waiting" and e["step"] == "second" for e in shown["events"])


async def test_a_tenant_past_its_open_runs_limit_is_refused_new_runs_and_others_are_not(secured):
    """``max_open_runs`` (here set through the tenant registry, while the system runs) bounds the
    runs a tenant leaves waiting; another tenant starts runs as before."""
    names = ("auth", "router", "tools", "workflow")
    async with running_services(secured.url, secured.state_dir, names, DEFINITIONS) as services:
        workflow = services["workflow"]
        catalog = workflow.tenants.catalog
        acme = json.loads(catalog.tenants["acme"].model_dump_json())
        admin = await nats.connect(
            secured.url, user="admin", password=secured.secrets.passwords["admin"], inbox_prefix=b"_INBOX._admin"
        )
        clerk = await client_for(secured, "clerk")
        globex = await CorralClient.connect(
            secured.url, tenant="globex", token=mint_dev_token("globex", key=secured.secrets.dev_key)
        )
        try:
            await (await Registry(admin).open()).add(TenantPolicy.model_validate({**acme, "max_open_runs": 2}), catalog)
            await until(lambda: workflow.tenants.policy("acme").max_open_runs == 2, "the registry's limit applied")
            runs = [(await clerk.request(target="two_approvals", input={})).run_id for _ in range(2)]
            await until(lambda: open_runs(workflow, "acme") == 2, "the census counted both")
            with pytest.raises(LimitExceeded, match="max_open_runs 2"):
                await clerk.request(target="two_approvals", input={})
            assert (await globex.request(target="five", input={"value": 1})).run_id  # not acme's limit
            await clerk.cancel(runs[0])
            await waitfor_status(clerk, runs[0], "cancelled")
            await until(lambda: open_runs(workflow, "acme") == 1, "the census saw the cancelled run go")
            assert (await clerk.request(target="two_approvals", input={})).run_id not in runs
        finally:
            await clerk.close()
            await globex.close()
            await admin.close()


def open_runs(workflow, tenant: str) -> int:
    (figure,) = [f for f in workflow.stats.snapshot(tenants=[tenant])["figures"] if f["name"] == "workflow_runs_open"]
    return (figure.get("tenants", {}).get(tenant) or {}).get("value", 0)


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"not within 10 s: {what}"
        await asyncio.sleep(0.02)  # polling a condition with a deadline
