"""Spans with OpenTelemetry, when ``CORRAL_TRACES`` turns them on (``otlp`` or ``console``; off by default).

Off, nothing here is imported beyond this module's own few names and no OpenTelemetry code runs:
the envelope's ``trace`` (a W3C traceparent, ``contracts/traceparent.py``) is only carried on.
On, each handled message is one consumer span (``process``), the child of the span its envelope
names; each call it makes is a client span (``send``, awaiting the reply) or a producer span
(``send``, a request passed on), whose id the outgoing envelope carries as its parent; each model
call is a GenAI client span. Attributes follow OpenTelemetry's messaging and GenAI conventions,
plus ``corral.tenant_id`` and ``corral.run_id``.

Every service has a tracer provider of its own (its ``service.name``), none is installed
globally: several services in one process (the tests) keep theirs apart.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from contracts import traceparent

if TYPE_CHECKING:
    from services.runtime.request import Request

MODES = ("off", "otlp", "console")
# Tests: the exporter every service that traces sends its spans to (``export_to``).
_test_exporter: Any = None
# The tracing of the message this task is handling, and its tenant and run (model calls read it).
_handling: contextvars.ContextVar[tuple[Tracing, str, str | None] | None] = contextvars.ContextVar(
    "corral_tracing", default=None
)


class TracingUnavailable(RuntimeError):
    """Tracing is on but OpenTelemetry is not installed, or not configured."""


def export_to(exporter: Any) -> None:
    """Tests: send the spans of every service started from now on to ``exporter`` (an SDK
    ``SpanExporter``, e.g. ``InMemorySpanExporter``), whatever ``CORRAL_TRACES`` says; None undoes it."""
    global _test_exporter
    _test_exporter = exporter


def start(service: str, mode: str) -> Tracing | None:
    """The service's tracing, or None when it is off (the default)."""
    if mode == "off" and _test_exporter is None:
        return None
    try:
        return Tracing(service, mode)
    except ImportError as error:
        raise TracingUnavailable(
            f"CORRAL_TRACES={mode} needs OpenTelemetry: pip install 'corral[traces]' ({error.name} is missing)"
        ) from None


def family(subject: str) -> str:
    """A subject without its tenant token (``t.acme.tools.call.x`` -> ``t.*.tools.call.x``): a
    span's destination names the kind of subject, the tenant is an attribute."""
    if subject.startswith("t."):
        rest = subject.split(".", 2)
        return f"t.*.{rest[2]}" if len(rest) == 3 else subject
    return subject


class Tracing:
    """One service's spans."""

    def __init__(self, service: str, mode: str) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self._trace = trace
        self.provider = TracerProvider(resource=Resource.create({"service.name": f"corral-{service}"}))
        if _test_exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(_test_exporter))
        elif mode == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            self.provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        else:
            if not (
                os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            ):
                raise TracingUnavailable(
                    "CORRAL_TRACES=otlp needs OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://127.0.0.1:4318)"
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("corral")
        self.service = service

    # ---- a handled message ----------------------------------------------------------

    def process(self, request: Request[Any], destination: str, operation: str) -> Any:
        """Start the consumer span of ``request`` (the child of its envelope's trace context, if
        valid) and make it current; ``request.trace`` then names it for what follows."""
        trace = self._trace
        parent = None
        found = traceparent.parse(request.trace)
        if found is not None:
            trace_id, span_id, flags = found
            remote = trace.SpanContext(
                int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=trace.TraceFlags(int(flags, 16))
            )
            parent = trace.set_span_in_context(trace.NonRecordingSpan(remote))
        attributes = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.operation.name": operation,
            "messaging.destination.name": destination,
            "messaging.message.id": request.envelope.id,
            "messaging.message.body.size": request.size,
            "corral.tenant_id": request.tenant,
        }
        if request.envelope.run_id is not None:
            attributes["corral.run_id"] = request.envelope.run_id
        span = self.tracer.start_span(
            f"process {destination}", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
        )
        request.trace = _traceparent_of(span)
        token = _handling.set((self, request.tenant, request.envelope.run_id))
        attached = trace.use_span(span, end_on_exit=False)
        attached.__enter__()
        return span, attached, token

    def finished(self, handle: Any, failure: str | None) -> None:
        span, attached, token = handle
        if failure is not None:
            span.set_attribute("error.type", failure)
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        attached.__exit__(None, None, None)
        _handling.reset(token)
        span.end()

    # ---- calls it makes -------------------------------------------------------------

    @contextlib.contextmanager
    def send(self, request: Request[Any], subject: str, awaits_reply: bool) -> Iterator[str]:
        """A span around one outgoing message; yields the traceparent its envelope carries."""
        trace = self._trace
        destination = family(subject)
        attributes = {
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.operation.name": "request" if awaits_reply else "publish",
            "messaging.destination.name": destination,
            "corral.tenant_id": request.tenant,
        }
        if request.envelope.run_id is not None:
            attributes["corral.run_id"] = request.envelope.run_id
        kind = trace.SpanKind.CLIENT if awaits_reply else trace.SpanKind.PRODUCER
        with self.tracer.start_as_current_span(f"send {destination}", kind=kind, attributes=attributes) as span:
            yield _traceparent_of(span)

    @contextlib.contextmanager
    def model_call(self, system: str, model: str, name: str, tenant: str, run_id: str | None) -> Iterator[Any]:
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": system,
            "gen_ai.request.model": model,
            "corral.model": name,
            "corral.tenant_id": tenant,
        }
        if run_id is not None:
            attributes["corral.run_id"] = run_id
        kind = self._trace.SpanKind.CLIENT
        with self.tracer.start_as_current_span(f"chat {model}", kind=kind, attributes=attributes) as span:
            yield span

    def shutdown(self) -> None:
        self.provider.shutdown()


def _traceparent_of(span: Any) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


class _TracedModel:
    """A model client whose completions are GenAI spans (only while a traced message is handled)."""

    def __init__(self, client: Any, system: str, model: str, name: str, handling: tuple[Tracing, str, str | None]):
        self._client, self._system, self._model, self._name, self._handling = client, system, model, name, handling

    async def complete(self, *args: Any, **kwargs: Any) -> Any:
        tracing, tenant, run_id = self._handling
        with tracing.model_call(self._system, self._model, self._name, tenant, run_id) as span:
            completion = await self._client.complete(*args, **kwargs)
            usage = completion.usage
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            return completion

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def traced_model(client: Any, system: str, model: str, name: str) -> Any:
    """``client`` itself, or one that makes GenAI spans if this task handles a traced message."""
    handling = _handling.get()
    return client if handling is None else _TracedModel(client, system, model, name, handling)
