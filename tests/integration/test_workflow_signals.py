"""Signals sent before the run reaches their wait, over a real broker configured as in
production: kept in the run's history and taken when the run gets there, with the wait's scope
checked when the signal is sent; a signal no wait ahead takes is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.errors import Conflict, Forbidden
from corral.client import CorralClient
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
