"""A request crosses router -> graph -> tools over a real broker, configured as in production."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys

import nats
import pytest

from contracts import subjects
from contracts.envelope import Envelope, Kind, RouterRequest
from contracts.errors import DeadlineExceeded, NotFound, Unavailable
from contracts.replies import decode_reply
from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from tests.support.services import answering, running_services

ALL = ("auth", "router", "graph", "tools")


@pytest.fixture
async def system(secured):
    async with running_services(secured.url, secured.state_dir, ALL) as services:
        yield secured, services


async def client_for(broker, tenant):
    return await CorralClient.connect(
        broker.url, tenant=tenant, token=mint_dev_token(tenant, key=broker.secrets.dev_key)
    )


async def raw_tenant_connection(broker, tenant, **options):
    return await nats.connect(
        broker.url,
        token=mint_dev_token(tenant, key=broker.secrets.dev_key),
        inbox_prefix=subjects.inbox_prefix(tenant).encode(),
        **options,
    )


async def test_each_tenant_is_answered_from_its_own_data(system):
    broker, _ = system
    acme, globex = await client_for(broker, "acme"), await client_for(broker, "globex")
    try:
        a, g = await asyncio.gather(acme.request("where is my order?"), globex.request("where is my order?"))
    finally:
        await acme.close()
        await globex.close()
    assert a.output.startswith("Order A-")
    assert g.output.startswith("Order G-")


async def test_a_run_reports_its_progress_on_its_events_subject(system):
    broker, _ = system
    acme = await client_for(broker, "acme")
    try:
        result = await acme.request("where is my order?")
    finally:
        await acme.close()
    steps = [(e.service, e.type.value, e.node) for e in result.events]
    assert steps == [
        ("router", "accepted", None),
        ("graph", "started", None),
        ("graph", "node_started", "lookup"),
        ("graph", "node_completed", "lookup"),
        ("graph", "node_started", "answer"),
        ("graph", "node_completed", "answer"),
        ("graph", "completed", None),
    ]


async def test_an_unknown_target_is_a_typed_error_and_a_failed_event(system):
    broker, _ = system
    acme = await client_for(broker, "acme")
    events = []
    try:
        with pytest.raises(NotFound, match="unknown target 'nope'"):
            await acme.request("x", target="nope", on_event=events.append)
    finally:
        await acme.close()
    assert [e.type.value for e in events] == ["failed"]
    assert events[0].data["code"] == "not_found"


async def test_an_expired_deadline_is_refused_without_running_anything(system):
    broker, _ = system
    nc = await raw_tenant_connection(broker, "acme")
    from contracts.envelope import deadline_in

    late = Envelope[RouterRequest](
        kind=Kind.REQUEST, tenant_id="acme", deadline=deadline_in(-1), payload=RouterRequest()
    )
    try:
        reply = await nc.request(subjects.router_request("acme", "dev"), late.model_dump_json().encode(), timeout=5)
    finally:
        await nc.close()
    with pytest.raises(DeadlineExceeded):
        decode_reply(reply.data)


async def assert_refused_at_once_for_lack_of_an_executor(broker):
    acme = await client_for(broker, "acme")
    try:
        with pytest.raises(Unavailable, match="no service is serving"):
            await acme.request("where is my order?", timeout=10)  # not a DeadlineExceeded 10 s later
    finally:
        await acme.close()


async def test_without_a_graph_executor_the_router_answers_with_an_error_not_a_hang(secured):
    async with running_services(secured.url, secured.state_dir, ("auth", "router")):
        await assert_refused_at_once_for_lack_of_an_executor(secured)


async def until(liveness, up):
    while liveness.up is not up:
        liveness.changed.clear()
        await liveness.changed.wait()


async def test_the_executor_answers_the_client_directly_and_its_absence_is_noticed(secured):
    """The router passes a run on with the client's reply subject; when the last executor goes,
    the router's probe notices and requests fail at once again instead of at their deadline."""
    fast = {"probe_interval_s": 0.05}
    async with running_services(secured.url, secured.state_dir, ("auth", "router", "tools"), **fast) as services:
        executor = services["router"].watched["graph"]
        nc = await raw_tenant_connection(secured, "acme")
        request = Envelope[RouterRequest](
            kind=Kind.REQUEST, tenant_id="acme", payload=RouterRequest(input={"text": "where is my order?"})
        )
        try:
            async with running_services(secured.url, secured.state_dir, ("graph",), **fast):
                await asyncio.wait_for(until(executor, True), 10)
                reply = await nc.request(
                    subjects.router_request("acme", "dev"), request.model_dump_json().encode(), timeout=10
                )
            # Caused by the run the router passed on, not by the client's request: no relay.
            answer = Envelope.model_validate_json(reply.data)
            assert answer.kind == Kind.RESULT and answer.correlation_id == request.id
            assert answer.causation_id != request.id
            await asyncio.wait_for(until(executor, False), 10)
            await assert_refused_at_once_for_lack_of_an_executor(secured)
        finally:
            await nc.close()


async def test_an_executor_that_stops_says_so_and_the_router_takes_the_long_way_at_once(secured):
    """The last graph executor's stop (what SIGTERM runs) begins with its leaving notice: the
    router stops passing runs on to it at once, not at its next probe (a minute away here), so
    no request is passed on to nobody to wait out its deadline."""
    slow = {"probe_interval_s": 60.0}
    async with running_services(secured.url, secured.state_dir, ("auth", "tools")):
        graph = contextlib.AsyncExitStack()
        graphs = await graph.enter_async_context(running_services(secured.url, secured.state_dir, ("graph",)))
        try:
            async with running_services(secured.url, secured.state_dir, ("router",), **slow) as services:
                executor = services["router"].watched["graph"]
                await asyncio.wait_for(until(executor, True), 10)  # its first probe, at its start
                stopping = asyncio.create_task(graph.aclose())
                await asyncio.wait_for(until(executor, False), 10)
                # Heard while the replica was still connected (in its grace): its own notice, not
                # the auth service's announcement of its closed connection, which comes after.
                assert executor.notices == 1 and graphs["graph"].nc.is_connected
                await stopping
                await assert_refused_at_once_for_lack_of_an_executor(secured)
        finally:
            await graph.aclose()


async def test_an_executor_killed_with_sigkill_is_announced_and_the_router_takes_the_long_way_at_once(secured):
    """The last graph executor, a process of its own, is killed with SIGKILL: it says nothing,
    but the broker sees its connection close and the auth service announces the departure on
    its leaving subject, so the router stops passing runs on to nobody at once, not at its next
    probe (a minute away here)."""
    env = {
        **os.environ,
        "CORRAL_NATS_URL": secured.url,
        "CORRAL_STATE_DIR": str(secured.state_dir),
        "CORRAL_LOG_LEVEL": "warning",
    }
    async with running_services(secured.url, secured.state_dir, ("auth", "tools")):
        graph = subprocess.Popen([sys.executable, "-m", "services.graph"], env=env)
        try:
            admin = await secured.admin()
            try:
                await answering(admin, "graph", graph)
            finally:
                await admin.close()
            async with running_services(secured.url, secured.state_dir, ("router",), probe_interval_s=60.0) as routers:
                executor = routers["router"].watched["graph"]
                await asyncio.wait_for(until(executor, True), 10)  # its first probe, at its start
                graph.kill()
                await asyncio.to_thread(graph.wait, 10)
                await asyncio.wait_for(until(executor, False), 10)
                assert executor.notices == 1  # the auth service's: the killed replica sent none
                await assert_refused_at_once_for_lack_of_an_executor(secured)
        finally:
            if graph.poll() is None:
                graph.kill()
                graph.wait()


async def test_a_tenant_without_routing_rules_is_forbidden(system):
    broker, _ = system
    from contracts.errors import Forbidden

    stranger = await client_for(broker, "initech")
    try:
        with pytest.raises(Forbidden, match="no routing rules"):
            await stranger.request("hello")
    finally:
        await stranger.close()


async def test_support_triage_fans_out_joins_and_decides_per_tenant(system):
    broker, _ = system
    acme, globex = await client_for(broker, "acme"), await client_for(broker, "globex")
    ticket = "My parcel has not arrived, where is it?"
    try:
        a = await acme.request(ticket, target="support_triage")
        g = await globex.request(ticket, target="support_triage")
    finally:
        await acme.close()
        await globex.close()
    # acme has an open delivery incident: the rule escalates; globex has none: a reply is drafted.
    assert a.output.startswith("Escalated to on-call: delivery issue (Depot in Phoenix closed by sandstorm)")
    assert "A-1004" in a.output
    assert g.output.startswith("Thank you for writing to us")
    completed = [e.node for e in a.events if e.type.value == "node_completed"]
    # The two lookups run in parallel and report as they finish; the path is in declaration order.
    assert completed[0] == "classify" and set(completed[1:3]) == {"orders", "incidents"}
    assert completed[3:] == ["gather", "escalate"]
    assert a.events[-1].data["path"] == ["classify", "orders", "incidents", "gather", "escalate"]
    assert a.events[-1].data["tokens"]["triage"] > 0  # model usage is metered per run
