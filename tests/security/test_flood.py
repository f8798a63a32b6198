"""One tenant cannot starve another: admission by the subject's tenant before decoding,
per-tenant in-flight caps and queues, cheap refusals (services/runtime/fairness.py)."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
import yaml

from contracts import subjects
from contracts.envelope import Kind, RouterRequest, ToolCall, new_envelope_json
from contracts.errors import RateLimited
from contracts.replies import decode_reply
from services.auth.tokens import mint_dev_token
from services.runtime import connection
from services.runtime.manifest import Consume, Manifest
from services.runtime.requests import Requester
from services.runtime.service import Request, Service
from services.runtime.settings import Settings
from tests.support.services import running_services

GATE = Manifest(
    "gate",
    "holds acme's calls until released",
    (Consume("call", "t.*.tool.gate.call", Kind.TOOL_CALL, ToolCall, "holds acme's calls"),),
    audit=False,
)


async def until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)  # polling with a deadline


async def tenant_requester(url: str, tenant: str) -> tuple[connection.Connection, Requester]:
    nc = await connection.connect(url, inbox_prefix=subjects.inbox_prefix(tenant).encode())
    requester = Requester(nc)
    await requester.start()
    return nc, requester


async def tenant_nc(broker, tenant: str) -> nats.NATS:
    return await nats.connect(
        broker.url,
        token=mint_dev_token(tenant, key=broker.secrets.dev_key),
        inbox_prefix=subjects.inbox_prefix(tenant).encode(),
    )


def call(tenant: str) -> bytes:
    return new_envelope_json(Kind.TOOL_CALL, tenant, ToolCall(tool="gate"), deadline=time.time() + 60)


async def test_a_tenant_flooding_a_replica_holds_only_its_share_and_another_is_served_at_once(nats_url):
    release = asyncio.Event()
    settings = Settings(
        nats_url=nats_url,
        log_level="error",
        max_in_flight=32,
        max_in_flight_per_tenant=4,
        max_queued_per_tenant=8,
        max_queued=64,
    )
    service = Service(GATE, settings)

    @service.handler("call")
    async def gate(req: Request[ToolCall]) -> str:
        if req.tenant == "acme":
            await release.wait()
        return req.tenant

    await service.start()
    acme_nc, acme = await tenant_requester(nats_url, "acme")
    globex_nc, globex = await tenant_requester(nats_url, "globex")
    try:
        flood = [
            asyncio.create_task(acme.request(subjects.tool_call("acme", "gate"), call("acme"), 30)) for _ in range(40)
        ]

        def refused() -> int:
            (endpoint,) = service.stats.snapshot(tenants=["acme"])["endpoints"]
            return endpoint["tenants"].get("acme", {}).get("refusals", {}).get("rate_limited", 0)

        await until(lambda: refused() == 28)  # 4 in flight, 8 waiting, the rest refused at once
        answer = await globex.request(subjects.tool_call("globex", "gate"), call("globex"), 5)
        assert decode_reply(answer.data) == "globex"  # served while acme's calls still hold their share
        release.set()
        outcomes = []
        for reply in await asyncio.gather(*flood):
            try:
                outcomes.append(decode_reply(reply.data))
            except RateLimited as error:
                outcomes.append(type(error).__name__)
    finally:
        release.set()
        for requester, nc in ((acme, acme_nc), (globex, globex_nc)):
            await requester.stop()
            await nc.close()
        await service.stop()
    assert outcomes.count("acme") == 12 and outcomes.count("RateLimited") == 28


DEFINITIONS = {
    "tools": [{"name": "orders_lookup", "python": {"callable": "corral.demo.tools:lookup_orders"}}],
    "graphs": [
        {"name": "g", "entry": "r", "nodes": {"r": {"kind": "respond", "template": "ok"}}},
    ],
    "tenants": [
        {
            "tenant": "acme",
            "default_route": "g",
            "routes": {"g": {"graph": "g"}},
            "rate_limit": {"per_second": 0.001, "burst": 2},
        },
        {"tenant": "globex", "default_route": "g", "routes": {"g": {"graph": "g"}}},
    ],
}


async def test_the_rate_limit_is_checked_from_the_subject_before_the_body_is_decoded(secured, tmp_path):
    (tmp_path / "defs.yaml").write_text(yaml.safe_dump(DEFINITIONS))
    async with running_services(
        secured.url, secured.state_dir, ("auth", "router", "graph", "tools"), definitions=tmp_path / "defs.yaml"
    ):
        acme = await tenant_nc(secured, "acme")
        try:
            good = new_envelope_json(Kind.REQUEST, "acme", RouterRequest(input={"text": "hi"}))
            for _ in range(2):  # the burst
                assert (
                    decode_reply((await acme.request(subjects.router_request("acme", "dev"), good, timeout=5)).data)
                    == "ok"
                )
            flood = await asyncio.gather(
                *[
                    acme.request(subjects.router_request("acme", "dev"), b"\x00 not even json", timeout=5)
                    for _ in range(200)
                ]
            )
        finally:
            await acme.close()
        for reply in flood:  # refused for the rate, never decoded (it would be invalid_request)
            with pytest.raises(RateLimited):
                decode_reply(reply.data)
        globex = await tenant_nc(secured, "globex")
        try:
            request = new_envelope_json(Kind.REQUEST, "globex", RouterRequest(input={"text": "hi"}))
            reply = await globex.request(subjects.router_request("globex", "dev"), request, timeout=5)
        finally:
            await globex.close()
        assert decode_reply(reply.data) == "ok"  # the other tenant is untouched


async def test_a_tenants_rate_limit_holds_across_router_replicas(secured, tmp_path):
    """Each replica takes its share of the tenant's rate and burst: two routers admit the burst
    once, not twice."""
    definitions = {
        **DEFINITIONS,
        "tenants": [
            {
                "tenant": "acme",
                "default_route": "g",
                "routes": {"g": {"graph": "g"}},
                "rate_limit": {"per_second": 0.001, "burst": 10},
            }
        ],
    }
    (tmp_path / "defs.yaml").write_text(yaml.safe_dump(definitions))
    names = ("auth", "router", "graph", "tools")
    async with (
        running_services(secured.url, secured.state_dir, names, definitions=tmp_path / "defs.yaml") as one,
        running_services(secured.url, secured.state_dir, ("router",), definitions=tmp_path / "defs.yaml") as two,
    ):
        for router in (one["router"], two["router"]):
            while router.replicas.count != 2:  # each counts the other (once a probe interval)
                router.replicas.counted.clear()
                await asyncio.wait_for(router.replicas.counted.wait(), 10)
        acme = await tenant_nc(secured, "acme")
        try:
            request = new_envelope_json(Kind.REQUEST, "acme", RouterRequest(input={"text": "hi"}))
            replies = await asyncio.gather(
                *[acme.request(subjects.router_request("acme", "dev"), request, timeout=5) for _ in range(40)]
            )
        finally:
            await acme.close()
    admitted = 0
    for reply in replies:
        try:
            decode_reply(reply.data)
            admitted += 1
        except RateLimited:
            pass
    # 5 per replica at most; fewer if the queue group gave one replica more than its share.
    assert 1 <= admitted <= 10


async def test_a_stopping_replica_answers_its_waiting_messages_but_never_into_a_service_inbox(nats_url):
    """A tenant-facing message that waited for its tenant's turn was never decoded or guarded:
    when the replica stops, it is answered `unavailable` only into the tenant's own inbox."""
    from contracts.errors import Unavailable

    facing = Manifest(
        "door",
        "a tenant-facing gate",
        (Consume("call", "t.*.door.call.*", Kind.TOOL_CALL, ToolCall, "holds calls", tenant_facing=True),),
        audit=False,
    )
    release = asyncio.Event()
    settings = Settings(nats_url=nats_url, log_level="error", max_in_flight_per_tenant=1, drain_timeout_s=0.2)
    service = Service(facing, settings)

    @service.handler("call")
    async def hold(req: Request[ToolCall]) -> str:
        await release.wait()
        return "done"

    await service.start()
    acme_nc, acme = await tenant_requester(nats_url, "acme")
    spy = await nats.connect(nats_url)
    try:
        stolen = await spy.subscribe("_INBOX._graph.>")
        own = await acme_nc.subscribe("_INBOX.acme.waiting")
        await spy.flush()
        await acme_nc.flush()
        subject = f"t.acme.door.call.{subjects.principal_token('dev')}"
        held = asyncio.create_task(acme.request(subject, call("acme"), 30))
        await until(lambda: service._fair.in_flight("acme") == 1)
        await acme_nc.publish(subject, call("acme"), reply="_INBOX._graph.x.1")  # a tenant aiming at a service
        await acme_nc.publish(subject, call("acme"), reply="_INBOX.acme.waiting")
        await acme_nc.flush()
        await until(lambda: service._fair.waiting("acme") == 2)
        await service.stop()
        answer = await own.next_msg(timeout=10)
        with pytest.raises(Unavailable):
            decode_reply(answer.data)
        await spy.flush()
        assert stolen.pending_msgs == 0
    finally:
        release.set()
        held.cancel()
        await acme.stop()
        await acme_nc.close()
        await spy.close()
