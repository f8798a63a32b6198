"""A router request whose reply subject is outside its tenant's inbox is refused, never answered
there, and its typed error goes out once as the failed event of its run, on the events subject of
the tenant and principal its subject names, and nowhere else (services/runtime/service.py,
``_report_misdirected``). A publishing connection is recorded instead of a broker."""

from __future__ import annotations

import dataclasses
import json

import pytest
from nats.aio.msg import Msg

from contracts import subjects
from contracts.definitions import Catalog, DefinitionsFile
from contracts.envelope import Kind, RouterRequest, WorkflowSignal, decode_envelope, envelope_of, new_envelope_json
from corral.demo import DEFINITIONS as DEFAULT_DEFINITIONS
from services.router.handlers import register
from services.router.manifest import MANIFEST as ROUTER
from services.runtime.catalog import load_catalog
from services.runtime.service import Service
from services.runtime.settings import Settings
from services.workflow.manifest import MANIFEST as WORKFLOW

ALICE, BOB = subjects.principal_token("alice"), subjects.principal_token("bob")


class Recorder:
    """Stands for the service's connection: what it publishes, in order."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, str]] = []

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers: dict | None = None) -> None:
        self.published.append((subject, payload, reply))


def router(catalog: Catalog | None = None) -> Service:
    service = Service(dataclasses.replace(ROUTER, audit=False), Settings(log_level="warning"))
    register(service, catalog or load_catalog(DEFAULT_DEFINITIONS))
    service.nc = Recorder()  # type: ignore[assignment]
    return service


async def deliver(service: Service, operation: str, subject: str, body: bytes, reply: str) -> None:
    op = service.manifest.operation(operation)
    stats = service.stats.operation(op.name, op.subject, service.name)
    handler = service.handlers.get(operation)
    msg = Msg(_client=service.nc, subject=subject, reply=reply, data=body)  # type: ignore[arg-type]
    await service._dispatch(op, envelope_of(op.payload), handler, stats, msg, reply)


def request(tenant: str = "acme", **fields) -> bytes:
    body = json.loads(new_envelope_json(Kind.REQUEST, "acme", RouterRequest(input={"text": "where is my order?"})))
    body.update(tenant_id=tenant, **fields)
    return json.dumps(body).encode()


def events_of(service: Service) -> list[tuple[str, dict]]:
    return [(subject, json.loads(body)) for subject, body, _ in service.nc.published]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "reply",
    ["_INBOX.hKq3mXb0Zc9.1", "_INBOX.globex.stolen", "t.globex.events.x.y", "_INBOX._graph.x", "_INBOX.acme"],
    ids=["nats-py default inbox", "another tenant's inbox", "a tenant subject", "a service inbox", "no token after"],
)
async def test_the_error_of_a_request_that_cannot_be_answered_goes_to_its_runs_events_only(reply):
    service = router()
    await deliver(service, "request", subjects.router_request("acme", "alice"), request(run_id="run-1"), reply)
    [(subject, event)] = events_of(service)
    assert subject == subjects.events("acme", "alice", "run-1") == f"t.acme.events.{ALICE}.run-1"
    envelope = decode_envelope(json.dumps(event))
    assert envelope.kind is Kind.EVENT and envelope.tenant_id == "acme" and envelope.principal == "alice"
    assert envelope.payload.type == "failed" and envelope.payload.service == "router"
    assert envelope.payload.data["code"] == "forbidden"
    assert "inbox_prefix '_INBOX.acme'" in envelope.payload.data["message"]


async def test_a_request_without_a_run_id_gets_a_new_one_for_its_failed_event():
    service = router()
    await deliver(service, "request", subjects.router_request("acme", "alice"), request(), "_INBOX.x.1")
    [(subject, event)] = events_of(service)
    assert subject.startswith(f"t.acme.events.{ALICE}.") and subject.endswith(f".{event['run_id']}")


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (request(tenant="globex", run_id="run-1"), "an envelope of another tenant"),
        (request(run_id="run-1", principal="bob"), "an envelope naming another principal"),
        (request(run_id="run-1", kind="tool_call"), "another kind"),
        (request(run_id="x.>"), "a run id that is not one token"),
        (request(run_id="run-1", payload={"input": {}, "stream": False}), "a client that does not watch"),
        (b'{"kind": "request", "tenant_id": "acme", "payload": {', "a body that is not JSON"),
    ],
)
async def test_nothing_is_published_for_a_misdirected_request_that_is_not_valid_or_not_watched(body, why):
    service = router()
    await deliver(service, "request", subjects.router_request("acme", "alice"), body, "_INBOX.globex.1")
    assert events_of(service) == [], why


async def test_a_request_into_its_own_inbox_is_answered_there_as_before():
    service = router()
    body = request(payload={"target": "nope", "input": {}})
    await deliver(service, "request", subjects.router_request("acme", "alice"), body, "_INBOX.acme.a.1")
    replies = [(subject, json.loads(sent)) for subject, sent, _ in service.nc.published if subject.startswith("_INBOX")]
    assert [(subject, sent["payload"]["code"]) for subject, sent in replies] == [("_INBOX.acme.a.1", "not_found")]


async def test_a_scoped_users_reply_into_a_colleagues_inbox_is_reported_to_the_user_alone():
    tenants = [{"tenant": "acme", "routes": {}, "principal_scoped": True}]
    service = router(Catalog.merge([DefinitionsFile.model_validate({"tenants": tenants})]))
    colleague = f"{subjects.inbox_prefix('acme', 'bob')}.spoof"
    await deliver(service, "request", subjects.router_request("acme", "alice"), request(run_id="run-1"), colleague)
    [(subject, event)] = events_of(service)
    assert subject == f"t.acme.events.{ALICE}.run-1" and BOB not in subject
    assert "principal 'alice'" in event["payload"]["data"]["message"]


async def test_a_workflow_signal_with_a_wrong_reply_subject_is_only_refused():
    service = Service(dataclasses.replace(WORKFLOW, audit=False), Settings(log_level="warning"))
    service.nc = Recorder()  # type: ignore[assignment]
    body = new_envelope_json(Kind.WORKFLOW_SIGNAL, "acme", WorkflowSignal(run_id="run-1", signal="approve"))
    await deliver(service, "signal", subjects.workflow_signal("acme", "alice"), body, "_INBOX.globex.1")
    assert service.nc.published == []  # type: ignore[attr-defined]


async def test_a_tenant_cannot_have_a_refusal_delivered_into_a_services_inbox():
    """A service's inbox (``_INBOX._<service>``) receives its own calls' replies: a refusal sent
    there could stand in for one. A tenant-facing request naming it is refused and not answered."""
    service = router()
    body = request(run_id="run-1", payload={"input": {}, "stream": False})
    await deliver(service, "request", subjects.router_request("acme", "alice"), body, "_INBOX._graph.abc.1")
    assert service.nc.published == []  # type: ignore[attr-defined]
