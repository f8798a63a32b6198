"""A request's trace context crosses client -> router -> graph -> tools, with spans when tracing is on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts import subjects, traceparent
from contracts.envelope import Kind, RouterRequest, new_envelope_json
from contracts.replies import decode_reply
from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from services.runtime import tracing
from services.runtime.service import Service
from tests.integration.test_pipeline import raw_tenant_connection
from tests.support.http import Reply, http_server
from tests.support.services import running_services

ALL = ("auth", "router", "graph", "tools")


@pytest.fixture
def seen(monkeypatch):
    """(service, the trace of the envelope it handled) for every message a service handled."""
    handled: list[tuple[str, str | None]] = []
    dispatch = Service._dispatch

    async def recording(self, *args, **kwargs):
        request = await dispatch(self, *args, **kwargs)
        if request is not None:
            handled.append((self.name, request.envelope.trace))
        return request

    monkeypatch.setattr(Service, "_dispatch", recording)
    return handled


async def ask(broker, tenant: str = "acme"):
    client = await CorralClient.connect(
        broker.url, tenant=tenant, token=mint_dev_token(tenant, key=broker.secrets.dev_key)
    )
    try:
        return await client.request("where is my order?")
    finally:
        await client.close()


async def test_with_tracing_off_every_hop_carries_the_client_s_trace(secured, seen):
    async with running_services(secured.url, secured.state_dir, ALL):
        result = await ask(secured)
    assert result.output.startswith("Order A-")
    assert traceparent.parse(result.trace) is not None
    assert {name for name, _ in seen} == {"router", "graph", "tools"}
    assert {trace for _, trace in seen} == {result.trace}  # off: carried on as it came


@pytest.mark.parametrize(
    "sent",
    [
        None,
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "x\n{}" * 40,
    ],
)
async def test_a_request_without_a_valid_trace_gets_a_new_one_at_the_router(secured, seen, sent):
    async with running_services(secured.url, secured.state_dir, ALL):
        nc = await raw_tenant_connection(secured, "acme")
        try:
            body = json.loads(
                new_envelope_json(
                    Kind.REQUEST,
                    "acme",
                    RouterRequest(input={"text": "where is my order?"}, stream=False),
                    run_id="raw-1",
                )
            )
            body["trace"] = sent
            msg = await nc.request(subjects.router_request("acme", "dev"), json.dumps(body).encode(), timeout=10)
        finally:
            await nc.close()
    assert decode_reply(msg.data).startswith("Order A-")
    traces = dict(seen)
    assert traces["router"] in (None, sent)  # what arrived: dropped, or (all-zero ids) replaced below
    made = traces["graph"]
    assert traceparent.parse(made) is not None
    assert traces["tools"] == made
    assert json.loads(msg.data)["trace"] == made  # the reply names the run's trace


@pytest.fixture
def spans():
    sdk = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = sdk.InMemorySpanExporter()
    tracing.export_to(exporter)
    try:
        yield exporter
    finally:
        tracing.export_to(None)


async def test_with_tracing_on_the_spans_of_a_run_form_one_trace_from_the_client_to_the_tool(secured, spans):
    async with running_services(secured.url, secured.state_dir, ALL) as services:
        assert services["graph"].tracing is not None
        result = await ask(secured)
    # The services have stopped: every span has ended and been exported.
    trace_id, client_span, _ = traceparent.parse(result.trace)
    finished = spans.get_finished_spans()
    assert finished
    assert {f"{s.context.trace_id:032x}" for s in finished} == {trace_id}
    by_id = {s.context.span_id: s for s in finished}
    service_of = {s.context.span_id: s.resource.attributes["service.name"] for s in finished}

    def process_span(service: str):
        (span,) = [
            s
            for s in finished
            if service_of[s.context.span_id] == f"corral-{service}" and s.name.startswith("process ")
        ]
        return span

    def caused_by(span) -> str:
        """The nearest process span of another service above ``span`` (or the client's span id)."""
        parent = span.parent
        while parent is not None and parent.span_id in by_id:
            above = by_id[parent.span_id]
            if above.name.startswith("process "):
                return service_of[above.context.span_id]
            parent = above.parent
        return f"{parent.span_id:016x}" if parent is not None else "none"

    router, graph, tools = process_span("router"), process_span("graph"), process_span("tools")
    assert caused_by(router) == client_span
    assert router.parent.is_remote
    assert caused_by(graph) == "corral-router"
    assert caused_by(tools) == "corral-graph"
    for span in finished:
        assert span.attributes["corral.tenant_id"] == "acme"
        assert span.attributes["corral.run_id"] == result.run_id
        assert span.attributes["messaging.system"] == "nats"
        assert "acme" not in span.attributes["messaging.destination.name"]
    assert router.attributes["messaging.operation.type"] == "process"
    # The operation's subject: no tenant, no principal token.
    assert router.attributes["messaging.destination.name"] in ("t.*.router.request.*", "t.*.router.request.>")
    assert tools.attributes["messaging.destination.name"] == "t.*.tool.*.call"
    sends = [s for s in finished if s.name.startswith("send ")]
    assert sends and all(s.attributes["messaging.operation.type"] == "send" for s in sends)
    assert "send t.*.tool.orders_lookup.call" in {s.name for s in sends}


async def test_a_workflow_runs_steps_under_the_trace_of_its_start(secured, seen):
    names = ("auth", "router", "tools", "workflow")
    definitions = Path(__file__).resolve().parent.parent / "support" / "workflows"
    async with running_services(secured.url, secured.state_dir, names, definitions=definitions):
        client = await CorralClient.connect(
            secured.url, tenant="acme", token=mint_dev_token("acme", key=secured.secrets.dev_key)
        )
        try:
            result = await client.request(target="five", input={"value": 1})
        finally:
            await client.close()
    assert result.output == 6
    trace_id = traceparent.trace_id_of(result.trace)
    steps = [trace for name, trace in seen if name == "tools"]
    # Every step's call is a hop of the start's trace (its own span under it), also when driven later.
    assert len(steps) == 5 and {traceparent.trace_id_of(trace) for trace in steps} == {trace_id}


async def test_a_model_call_is_a_genai_span_of_the_run_with_its_tokens(secured, spans):
    async with running_services(secured.url, secured.state_dir, ALL):
        client = await CorralClient.connect(
            secured.url, tenant="acme", token=mint_dev_token("acme", key=secured.secrets.dev_key)
        )
        try:
            result = await client.request("where is my order?", target="support_triage")
        finally:
            await client.close()
    trace_id = traceparent.trace_id_of(result.trace)
    chats = [s for s in spans.get_finished_spans() if s.name.startswith("chat ")]
    assert chats, [s.name for s in spans.get_finished_spans()]
    for span in chats:
        assert f"{span.context.trace_id:032x}" == trace_id
        assert span.attributes["gen_ai.request.model"] and span.attributes["gen_ai.system"]
        assert span.attributes["gen_ai.usage.input_tokens"] > 0
        assert span.attributes["corral.tenant_id"] == "acme"


async def test_spans_are_exported_over_otlp_to_a_collector(secured, monkeypatch):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    with http_server(lambda request: Reply(status=200, body=b"", content_type="application/x-protobuf")) as server:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.url)
        async with running_services(secured.url, secured.state_dir, ALL, traces="otlp"):
            result = await ask(secured)
        # Stopped: each service's batch went to the collector as it shut down.
        posts = [r for r in server.received if r.method == "POST" and r.path == "/v1/traces"]
    assert posts and all(r.headers.get("content-type") == "application/x-protobuf" for r in posts)
    trace_id = bytes.fromhex(traceparent.trace_id_of(result.trace))
    assert sum(trace_id in r.body for r in posts) >= 3  # router, graph and tools each sent the run's spans
