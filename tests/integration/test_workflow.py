"""The workflow engine over a real broker configured as in production: runs, retries, validation,
approvals by scope, sagas, timers, idempotent starts, queries and tenant isolation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from contracts import subjects
from contracts.envelope import Kind, new_envelope_json
from contracts.errors import Conflict, DeadlineExceeded, Forbidden, InvalidRequest, NotFound, ToolFailed
from corral.audit_reader import read_trail
from corral.client import CorralClient
from corral.demo.payments import URL_VARIABLE, PaymentsError, RefundLedger, serve_in_thread
from services.auth.tokens import mint_dev_token
from tests.support import workflow_tools
from tests.support.services import running_services
from tests.support.workflow_tools import waitfor_status

DEFINITIONS = Path(__file__).resolve().parent.parent / "support" / "workflows"
ALL = ("auth", "router", "tools", "workflow")


@pytest.fixture
async def system(secured):
    workflow_tools.reset()
    async with running_services(secured.url, secured.state_dir, ALL, definitions=DEFINITIONS) as services:
        yield secured, services


async def client_for(broker, tenant, sub="dev", scopes=()):
    token = mint_dev_token(tenant, key=broker.secrets.dev_key, sub=sub, scopes=tuple(scopes))
    return await CorralClient.connect(broker.url, tenant=tenant, token=token)


async def watch_acme_events(broker):
    """A connection of acme's watching all its events: (it, the envelopes seen, an event set once
    a workflow run's ``completed`` was seen)."""
    watcher = await nats.connect(
        broker.url, token=mint_dev_token("acme", key=broker.secrets.dev_key), inbox_prefix=b"_INBOX.acme"
    )
    seen: list[dict] = []
    completed = asyncio.Event()

    async def kept(msg) -> None:
        seen.append(json.loads(msg.data))
        if seen[-1]["payload"]["type"] == "completed" and seen[-1]["payload"]["service"] == "workflow":
            completed.set()

    await watcher.subscribe("t.acme.events.>", cb=kept)
    await watcher.flush()
    return watcher, seen, completed


async def test_a_five_step_run_completes_and_its_history_is_recorded(system):
    broker, _ = system
    acme = await client_for(broker, "acme")
    try:
        result = await acme.request(target="five", input={"value": 1})
        assert result.output == 6
        shown = await acme.show(result.run_id)
    finally:
        await acme.close()
    types = [event["type"] for event in shown["events"]]
    assert types[0] == "run_started" and types[-1] == "run_completed"
    assert types.count("step_completed") == 5
    assert shown["run"]["status"] == "completed"
    # Its first message holds its start and the start of its first step (one write, not two);
    # every later one a step's outcome and the next step's start.
    seqs = [event["seq"] for event in shown["events"]]
    assert types[:2] == ["run_started", "step_started"] and seqs[0] == seqs[1]
    assert len(set(seqs)) == 6
    watched = [e.type.value for e in result.events if e.service == "workflow"]
    assert watched[:2] == ["started", "step_started"]
    keys = workflow_tools.CALLS[("acme", "step")]
    assert keys == [f"{result.run_id}:s{i}" for i in range(1, 6)]
    assert [e.type.value for e in result.events if e.service == "workflow"][-1] == "completed"


async def test_a_run_followed_without_watching_publishes_only_its_outcome_and_records_every_step(system):
    broker, _ = system
    watcher, seen, completed = await watch_acme_events(broker)
    acme = await client_for(broker, "acme")
    try:
        result = await acme.request(target="five", input={"value": 1}, watch=False, follow=True)
        await asyncio.wait_for(completed.wait(), 10)
        shown = await acme.show(result.run_id)
        started = await acme.request(target="five", input={"value": 1}, watch=False)  # not followed
    finally:
        await acme.close()
        await watcher.close()
    assert result.output == 6
    assert [event.type.value for event in result.events] == ["completed"]
    assert [e["payload"]["type"] for e in seen if e["run_id"] == result.run_id] == ["completed"]
    assert [event["type"] for event in shown["events"]].count("step_completed") == 5
    assert started.output["status"] == "running" and started.events == []


async def test_a_run_followed_without_watching_answers_when_it_waits_for_a_signal(system):
    broker, _ = system
    acme = await client_for(broker, "acme")
    try:
        result = await acme.request(target="approval", input={"amount": 5000}, watch=False, follow=True)
    finally:
        await acme.close()
    assert result.output["status"] == "waiting" and result.output["waiting_for"] == "approve"
    assert [event.type.value for event in result.events] == ["waiting"]


async def test_every_event_of_a_run_carries_the_correlation_id_of_the_request_that_started_it(system):
    broker, _ = system
    watcher, seen, completed = await watch_acme_events(broker)
    acme = await client_for(broker, "acme")
    try:
        result = await acme.request(target="five", input={"value": 1})
        await asyncio.wait_for(completed.wait(), 10)
    finally:
        await acme.close()
        await watcher.close()
    of_run = [envelope for envelope in seen if envelope["run_id"] == result.run_id]
    assert len(of_run) >= 7  # accepted, started, five steps, completed
    assert len({envelope["correlation_id"] for envelope in of_run}) == 1
    assert of_run[0]["correlation_id"] is not None


async def test_an_input_outside_the_schema_is_refused_before_a_run_starts(system):
    broker, _ = system
    acme = await client_for(broker, "acme")
    try:
        with pytest.raises(InvalidRequest, match="value"):
            await acme.request(target="five", input={"nope": 1})
        assert await acme.runs() == []
    finally:
        await acme.close()


async def test_a_failing_step_is_retried_with_the_same_idempotency_key(system):
    broker, _ = system
    workflow_tools.FAILURES["*"] = 2
    acme = await client_for(broker, "acme")
    try:
        result = await acme.request(target="approval", input={"amount": 50})
    finally:
        await acme.close()
    assert result.output == 102
    keys = workflow_tools.CALLS[("acme", "flaky")]
    assert keys == [f"{result.run_id}:pay"] * 3
    assert [e.type.value for e in result.events].count("step_retrying") == 2


async def test_a_saga_compensates_completed_steps_in_reverse_when_a_step_fails_for_good(system):
    broker, _ = system
    workflow_tools.FAILURES["*"] = 10
    acme = await client_for(broker, "acme")
    try:
        with pytest.raises(ToolFailed):
            await acme.request(target="saga")
    finally:
        await acme.close()
    undone = workflow_tools.CALLS[("acme", "undo")]
    assert [key.rsplit(":", 2)[1] for key in undone] == ["b", "a"]


async def test_an_approval_needs_the_scope_and_records_who_approved(system):
    broker, _ = system
    acme = await client_for(broker, "acme")
    clerk = await client_for(broker, "acme", sub="clerk")
    manager = await client_for(broker, "acme", sub="manager", scopes=["refund:approve"])
    try:
        waiting = await acme.request(target="approval", input={"amount": 500})
        assert waiting.output["status"] == "waiting" and waiting.output["waiting_for"] == "approve"
        run_id = waiting.run_id
        with pytest.raises(Forbidden, match="refund:approve"):
            await clerk.signal(run_id, "approve", {"ok": True})
        with pytest.raises(Conflict, match="no wait ahead for signal 'other'"):
            await manager.signal(run_id, "other", scope="refund:approve")
        answer = await manager.signal(run_id, "approve", {"ok": True}, scope="refund:approve")
        assert answer["accepted"] is True
        shown = await waitfor_status(acme, run_id, "completed")
        with pytest.raises(Conflict, match="completed"):
            await manager.signal(run_id, "approve", scope="refund:approve")
    finally:
        for client in (acme, clerk, manager):
            await client.close()
    approvals = [e for e in shown["events"] if e["type"] == "signal_received"]
    assert len(approvals) == 1 and approvals[0]["by"] == "manager" and approvals[0]["scope"] == "refund:approve"


async def test_a_scope_the_token_does_not_hold_cannot_even_be_presented(system):
    broker, services = system
    clerk = await client_for(broker, "acme", sub="clerk")
    try:
        with pytest.raises(DeadlineExceeded):  # the broker refuses the publish: nothing answers
            await clerk.signal("nope", "approve", scope="refund:approve", timeout=1.0)
        errors = [str(error).lower() for error in clerk.errors]
    finally:
        await clerk.close()
    # The broker said why, to this connection only, and the workflow service never saw it.
    assert any("permissions violation" in error and "workflow.signal" in error for error in errors), errors
    endpoints = {e["name"]: e for e in services["workflow"].stats.snapshot(detail=False)["endpoints"]}
    assert endpoints["signal"]["num_requests"] == 0 and endpoints["signal"]["num_refusals"] == 0


async def test_another_tenants_run_cannot_be_seen_or_signalled(system):
    broker, _ = system
    acme = await client_for(broker, "acme")
    globex = await client_for(broker, "globex", scopes=["refund:approve"])
    try:
        waiting = await acme.request(target="approval", input={"amount": 500})
        run_id = waiting.run_id
        with pytest.raises(NotFound):
            await globex.signal(run_id, "approve", scope="refund:approve")
        with pytest.raises(NotFound):
            await globex.show(run_id)
        assert all(run["run_id"] != run_id for run in await globex.runs())
        await acme.cancel(run_id)
        shown = await waitfor_status(acme, run_id, "cancelled")
        assert shown["run"]["status"] == "cancelled"
    finally:
        await acme.close()
        await globex.close()


async def test_the_same_idempotency_key_returns_the_same_run_and_another_input_conflicts(system):
    broker, _ = system
    acme = await client_for(broker, "acme")
    try:
        first = await acme.request(target="five", input={"value": 1}, idempotency_key="order-7")
        again = await acme.request(target="five", input={"value": 1}, idempotency_key="order-7")
        assert again.output["run_id"] == first.run_id and again.output["deduplicated"] is True
        with pytest.raises(Conflict):
            await acme.request(target="five", input={"value": 2}, idempotency_key="order-7")
    finally:
        await acme.close()
    assert len(workflow_tools.CALLS[("acme", "step")]) == 5


async def test_durable_timers_sleep_and_time_out_and_parallel_branches_join(system):
    broker, _ = system
    acme = await client_for(broker, "acme")
    try:
        result = await acme.request(target="timers", timeout=20)
        shown = await waitfor_status(acme, result.run_id, "completed")
    finally:
        await acme.close()
    outputs = {e["step"]: e.get("output") for e in shown["events"] if e["type"] == "step_completed"}
    assert outputs["both"] == {"left": {"value": 11, "tenant": "acme"}, "right": {"value": 21, "tenant": "acme"}}
    types = [e["type"] for e in shown["events"]]
    assert "sleeping" in types and "wait_timed_out" in types


class LostAnswer(PaymentsError):
    status = 500
    code = "internal"


class LosesItsFirstAnswer(RefundLedger):
    """The demo payments API that refunds on the first try and then fails to answer it (a 500),
    as a provider can: the step is retried, with the same idempotency key."""

    def __init__(self) -> None:
        super().__init__()
        self.tries: list[str | None] = []

    def refund(self, tenant, key, body):
        self.tries.append(key)
        answer = super().refund(tenant, key, body)
        if len(self.tries) == 1:
            raise LostAnswer("the refund was made, but its answer was lost")
        return answer


async def test_the_demo_refund_goes_through_the_payments_api_once_per_run_even_when_retried(secured, monkeypatch):
    ledger = LosesItsFirstAnswer()
    with serve_in_thread(ledger) as payments:
        monkeypatch.setenv(URL_VARIABLE, payments.url)
        async with running_services(secured.url, secured.state_dir, ALL):  # the demo definitions
            acme = await client_for(secured, "acme")
            manager = await client_for(secured, "acme", sub="manager", scopes=["refund:approve"])
            try:
                small = await acme.request(target="refund", input={"order_id": "A-1001", "reason": "broken"})
                assert small.output == {"notified": "A-1001", "message": "Your refund is on its way."}
                large = await acme.request(target="refund", input={"order_id": "A-1002", "reason": "late"})
                assert large.output["status"] == "waiting"
                assert len(ledger.refunds("acme")) == 1  # nothing is refunded before the approval
                await manager.signal(large.run_id, "approve", {"note": "ok"}, scope="refund:approve")
                shown = await waitfor_status(acme, large.run_id, "completed")
                retried = await acme.show(small.run_id)
            finally:
                await acme.close()
                await manager.close()
    refunds = {refund["idempotency_key"]: refund for refund in ledger.refunds("acme")}
    assert set(refunds) == {f"{small.run_id}:refund", f"{large.run_id}:refund"}  # one refund per run
    assert ledger.tries == [f"{small.run_id}:refund", f"{small.run_id}:refund", f"{large.run_id}:refund"]
    tries = [e for e in retried["events"] if e.get("step") == "refund"]
    assert [(e["type"], e.get("attempt")) for e in tries if e["type"].startswith("step_")] == [
        ("step_started", 1),
        ("step_failed", 1),
        ("step_started", 2),
        ("step_completed", 2),
    ]
    refunded = [e for e in shown["events"] if e["type"] == "step_completed" and e["step"] == "refund"]
    assert refunded[0]["output"] == refunds[f"{large.run_id}:refund"]
    assert refunded[0]["output"]["amount"] == 250 and refunded[0]["output"]["status"] == "succeeded"
    assert ledger.refunds("globex") == []


async def approval_left_waiting(secured, definitions):
    """An approval run left waiting for its signal by services on ``definitions``, then stopped."""
    async with running_services(secured.url, secured.state_dir, ALL, definitions=definitions):
        acme = await client_for(secured, "acme")
        try:
            waiting = await acme.request(target="approval", input={"amount": 500})
            assert waiting.output["status"] == "waiting"
            return waiting
        finally:
            await acme.close()


async def test_a_running_run_keeps_its_definition_when_the_definitions_change(secured, tmp_path):
    first = tmp_path / "v1"
    first.mkdir()
    (first / "w.yaml").write_text((DEFINITIONS / "basic.yaml").read_text())
    second = tmp_path / "v2"
    second.mkdir()
    changed = (
        (DEFINITIONS / "basic.yaml")
        .read_text()
        .replace(
            "      - {name: done, kind: function,",
            "      - {name: extra, kind: sleep, seconds: 0.1}\n      - {name: done, kind: function,",
        )
    )
    (second / "w.yaml").write_text(changed)
    waiting = await approval_left_waiting(secured, first)
    async with running_services(secured.url, secured.state_dir, ALL, definitions=second):
        acme = await client_for(secured, "acme")
        manager = await client_for(secured, "acme", sub="manager", scopes=["refund:approve"])
        try:
            await manager.signal(waiting.run_id, "approve", scope="refund:approve")
            old = await waitfor_status(acme, waiting.run_id, "completed")
            fresh = await acme.request(target="approval", input={"amount": 50})
            new = await waitfor_status(acme, fresh.run_id, "completed")
        finally:
            await acme.close()
            await manager.close()
    assert "extra" not in {e.get("step") for e in old["events"]}  # pinned to the definition it started with
    assert "extra" in {e.get("step") for e in new["events"]}  # new runs take the new one


async def test_runs_started_one_after_another_are_all_driven_by_the_replica_that_started_them(secured):
    """A run driven from its start counts against its tenant's inline share until it ends. A
    count that was never given back (awaiting the run's cancelled index write raised) once sent
    every run after the share's first to the work queue, and some of those waited 2 s there."""
    workflow_tools.reset()
    limits = {"max_in_flight_per_tenant": 2}
    async with running_services(secured.url, secured.state_dir, ALL, definitions=DEFINITIONS, **limits) as services:
        acme = await client_for(secured, "acme")
        try:
            for value in range(6):
                assert (await acme.request(target="five", input={"value": value})).output == value + 5
        finally:
            await acme.close()
        task = next(op for op in services["workflow"].stats.operations if op.name == "task")
        assert task.totals()["num_requests"] == 0  # no wake-up went through the work queue


async def test_a_local_step_calls_its_tool_in_the_workflow_replica_with_the_same_checks(system):
    """``local``: no tools-service round trip, but the tenant still comes from the subject (a
    tenant key among the arguments is removed and audited), the key is the run's and step's,
    a failure is retried under the step's policy, and every call is in the tenant's audit trail."""
    broker, services = system
    workflow_tools.FAILURES["*"] = 1
    acme = await client_for(broker, "acme")
    try:
        result = await acme.request(target="local", input={"value": 1, "claimed": "globex"})
    finally:
        await acme.close()
    assert result.output == 3
    assert workflow_tools.CALLS[("acme", "step")] == [f"{result.run_id}:a"]
    assert workflow_tools.CALLS[("acme", "flaky")] == [f"{result.run_id}:b"] * 2  # failed once, retried
    assert ("globex", "step") not in workflow_tools.CALLS
    calls = next(op for op in services["tools"].stats.operations if op.name == "call")
    assert calls.totals()["num_requests"] == 0  # nothing went through the tools service
    figures = services["workflow"].stats.snapshot()["figures"]
    (local,) = [figure for figure in figures if figure["name"] == "workflow_local_tool_calls"]
    assert local["tenants"]["acme"]["by"] == {"ok": 2, "tool_failed": 1}
    await services["workflow"].flushed()
    trail = await read_trail(broker.url, "admin", broker.secrets.passwords["admin"], "acme")
    of_run = [record for record in trail.records if record.run_id == result.run_id]
    tool_calls = [(r.detail["tool"], r.outcome) for r in of_run if r.action == "tool_call"]
    assert tool_calls == [("step", "ok"), ("flaky", "failed"), ("flaky", "ok")]
    override = [r for r in of_run if r.action == "tenant_override_attempt"]
    assert len(override) == 1 and override[0].detail["removed"] == ["tenant_id"] and not trail.problems


async def test_a_pinned_runs_local_step_whose_tool_is_no_longer_local_goes_to_the_tools_service(secured, tmp_path):
    """A replica holds only the tools the current definitions call locally; a run that started
    with `pay` local (its definition pinned) finishes once `pay`'s tool is local nowhere."""
    basic = (DEFINITIONS / "basic.yaml").read_text()
    first, second = tmp_path / "v1", tmp_path / "v2"
    for folder in (first, second):
        folder.mkdir()
    local_pay = "      - {name: pay, kind: tool, tool: flaky, local: true,"
    (first / "w.yaml").write_text(basic.replace("      - {name: pay, kind: tool, tool: flaky,", local_pay))
    no_local_flaky = "      - {name: b, kind: tool, tool: flaky, args: {value: $a.value}}"
    (second / "w.yaml").write_text(
        basic.replace(
            "      - {name: b, kind: tool, tool: flaky, local: true, args: {value: $a.value}}", no_local_flaky
        )
    )
    assert local_pay in (first / "w.yaml").read_text() and no_local_flaky in (second / "w.yaml").read_text()
    waiting = await approval_left_waiting(secured, first)
    async with running_services(secured.url, secured.state_dir, ALL, definitions=second) as services:
        acme = await client_for(secured, "acme")
        manager = await client_for(secured, "acme", sub="manager", scopes=["refund:approve"])
        try:
            await manager.signal(waiting.run_id, "approve", scope="refund:approve")
            await waitfor_status(acme, waiting.run_id, "completed")
        finally:
            await acme.close()
            await manager.close()
        calls = next(op for op in services["tools"].stats.operations if op.name == "call")
        assert calls.totals()["num_requests"] >= 1  # pay's call went through the tools service


async def test_a_wake_up_for_a_run_its_replica_is_driving_comes_back_later_and_no_step_runs_twice(system):
    """A wake-up reaches the replica driving the run (its recovery timer firing late on a loaded
    machine, beside a hand-back's wake-up). The lease is that replica's own, so it used to be
    taken again: a second drive of the same run ran its current step again, and the two renewed
    the lease from under each other until both gave the run up and it stopped for good (seen in
    test_workflow_long.py on a loaded machine). The wake-up must wait for the drive to end."""
    broker, services = system
    acme = await client_for(broker, "acme")
    try:
        started = await acme.request(target="gated", input={"value": 1}, watch=False, follow=False)
        run_id = started.output["run_id"]
        await asyncio.wait_for(workflow_tools.ENTERED.wait(), 10)  # its first step is running
        task = next(op for op in services["workflow"].stats.operations if op.name == "task")
        body = new_envelope_json(Kind.WORKFLOW_TASK, "acme", json.dumps({"run_id": run_id}).encode(), run_id=run_id)
        # (as a replica sends one: tenants and the operator may not)
        await services["workflow"].nc.jetstream().publish(subjects.workflow_task("acme", run_id), body)
        deadline = asyncio.get_running_loop().time() + 10
        # Until the replica has handled the wake-up (or, wrongly, begun the step again with it).
        while task.totals()["num_requests"] < 1 and len(workflow_tools.HELD) < 2:
            assert asyncio.get_running_loop().time() < deadline, "the wake-up never reached the replica"
            await asyncio.sleep(0.02)  # polling its statistics with a deadline
        workflow_tools.GATE.set()
        shown = await waitfor_status(acme, run_id, "completed")
    finally:
        await acme.close()
    assert workflow_tools.HELD == [1]  # its step ran once
    assert [e["type"] for e in shown["events"]].count("step_started") == 2  # each step started once
