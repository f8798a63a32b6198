"""What a handler receives: the validated envelope, the tenant from the subject, and the ways to
answer, call other services, emit progress events and write audit records."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_json

from contracts import subjects
from contracts.envelope import Envelope, FollowEncoder, Kind, Result, RunEvent
from contracts.errors import DeadlineExceeded, Internal
from contracts.traceparent import trace_id_of

if TYPE_CHECKING:
    from services.runtime.service import Service

P = TypeVar("P", bound=BaseModel)
# A handler's return value when it passed the request on with its reply subject: the next hop
# answers the requester directly, so this service sends no reply of its own.
FORWARDED: Any = object()


class Request(Generic[P]):
    """What a handler receives: the validated envelope, the tenant from the subject, the service."""

    __slots__ = (
        "_encoder",
        "_events_subject",
        "_log",
        "_until",
        "envelope",
        "principal",
        "redeliver",
        "reply",
        "service",
        "size",
        "stream",
        "subject",
        "tenant",
        "trace",
    )

    def __init__(
        self,
        envelope: Envelope[P],
        tenant: str,
        subject: subjects.TenantSubject,
        service: Service,
        size: int = 0,
        reply: str = "",
        until: float | None = None,
        principal: str | None = None,
    ) -> None:
        self.envelope = envelope
        # Who asked: read from the subject for a tenant-facing operation (the broker lets a
        # connection publish only with its own), else as the trusted service before wrote it.
        self.principal = envelope.principal if principal is None else principal
        self.tenant = tenant
        self.subject = subject
        self.service = service
        self.size = size  # bytes of the message body, for admission limits
        self.reply = reply  # the requester's reply subject, already checked by the guard
        # The deadline as a timestamp: the datetime is read once, not on every check.
        deadline = envelope.deadline
        self._until = until if until is not None or deadline is None else deadline.timestamp()
        # Whether the client asked for progress events; without it nobody is listening.
        self.stream = True
        self._encoder: FollowEncoder | None = None
        self._events_subject: str | None = None
        self._log: Any = None
        # A durable operation's handler may hand its message back to the broker, to come again
        # after this many seconds, instead of acknowledging it (the work is not done here).
        self.redeliver: float | None = None
        # The traceparent of what follows: the envelope's, or this hop's span when tracing is on
        # (services/runtime/tracing.py), or a new trace for a tenant's request that had none.
        self.trace = envelope.trace

    @property
    def payload(self) -> P:
        return self.envelope.payload

    def remaining(self, default: float) -> float:
        """Seconds left before the request's deadline (``default`` if it has none)."""
        return default if self._until is None else self._until - time.time()

    @property
    def log(self) -> Any:
        # Bound lazily: most messages never log, and binding costs on the hot path.
        if self._log is None:
            self._log = self.service.log.bind(
                tenant_id=self.tenant, run_id=self.envelope.run_id, trace_id=trace_id_of(self.trace)
            )
        return self._log

    def encode(self, kind: Kind, payload: BaseModel) -> bytes:
        """An envelope following this request (same tenant, run, deadline, trace), as bytes."""
        return self.encode_json(kind, payload.model_dump_json().encode())

    def encode_json(self, kind: Kind, payload: bytes) -> bytes:
        """The same, with the payload already serialised (the JSON of a valid payload)."""
        if self._encoder is None:
            self._encoder = FollowEncoder(self.envelope, self._until, self.principal, trace=self.trace)
        return self._encoder.encode_json(kind, payload)

    def audit(self, action: str, outcome: str, **detail: Any) -> None:
        """Append a record about this request to the tenant's audit trail (written in the background)."""
        self.service.audit.record(
            self.tenant, action, outcome, principal=self.principal, run_id=self.envelope.run_id, **detail
        )

    def with_run_id(self, run_id: str) -> Request[P]:
        """The same request with a run id assigned (when the client did not choose one)."""
        envelope = self.envelope.model_copy(update={"run_id": run_id})
        request = Request(
            envelope, self.tenant, self.subject, self.service, self.size, self.reply, self._until, self.principal
        )
        request.stream = self.stream
        request.trace = self.trace
        return request

    async def emit(self, event: RunEvent) -> None:
        """Publish a progress event on ``t.<tenant>.events.<principal>.<run_id>`` (if the run has an id)."""
        if self.envelope.run_id is None or not self.stream:
            return
        if self._events_subject is None:
            self._events_subject = subjects.events(self.tenant, self.principal, self.envelope.run_id)
        await self.service.nc.publish(self._events_subject, self.encode(Kind.EVENT, event))

    async def call_json(
        self, subject: str, kind: Kind, payload: bytes, *, timeout: float | None = None, passed_on: bool = False
    ) -> Any:
        """Request another service with an envelope that follows this one and carries ``payload``
        (the JSON of a valid payload: handlers write it directly); returns the reply's output.
        ``passed_on``: the call is this request itself, relayed (it keeps the client's key)."""
        remaining = self.remaining(self.service.settings.default_timeout_s)
        limit = remaining if timeout is None else min(timeout, remaining)
        if limit <= 0:
            raise DeadlineExceeded("deadline passed before the call")
        tracing = self.service.tracing
        if tracing is not None:
            with tracing.send(self, subject, awaits_reply=True) as trace:
                body = self._traced(kind, payload, trace, passed_on)
                return await self.service.request(subject, body, timeout=limit)
        body = self._passed_on(kind, payload) if passed_on else self.encode_json(kind, payload)
        return await self.service.request(subject, body, timeout=limit)

    def _traced(self, kind: Kind, payload: bytes, trace: str, passed_on: bool) -> bytes:
        """The call's envelope with the call's own span as its trace context's parent."""
        key = self.envelope.idempotency_key if passed_on else None
        return FollowEncoder(self.envelope, self._until, self.principal, key, trace).encode_json(kind, payload)

    def _passed_on(self, kind: Kind, payload: bytes) -> bytes:
        """This request as the next hop gets it: it keeps the client's idempotency key, by which
        the next hop deduplicates (a workflow start); a call of the handler's own never does."""
        key = self.envelope.idempotency_key
        if key is None:
            return self.encode_json(kind, payload)
        return FollowEncoder(self.envelope, self._until, self.principal, key, self.trace).encode_json(kind, payload)

    async def forward_json(self, subject: str, kind: Kind, payload: bytes) -> Any:
        """Pass the request on to another service, which answers the requester directly.

        The envelope follows this one (same tenant, run and deadline), carries ``payload`` (the
        JSON of a valid payload) and keeps the requester's reply subject, so the answer skips this
        hop on its way back. If nothing serves ``subject``, the broker's no-responders status goes
        to this connection, not to the requester: callers check that a service is running first
        (the manifest's ``watches``).
        """
        if self.remaining(1.0) <= 0:
            raise DeadlineExceeded("deadline passed before the request could be passed on")
        tracing = self.service.tracing
        if tracing is not None:
            with tracing.send(self, subject, awaits_reply=False) as trace:
                body = self._traced(kind, payload, trace, passed_on=True)
                await self.service.nc.publish(subject, body, reply=self.reply)
            return FORWARDED
        await self.service.nc.publish(subject, self._passed_on(kind, payload), reply=self.reply)
        return FORWARDED


def encode_result(request: Request[Any], output: Any) -> bytes:
    """The reply to a request; a handler output that is not JSON is the handler's error, not a crash."""
    if isinstance(output, Result):
        output = output.output
    try:
        # Straight to JSON (the Result payload is just its output): a third of a model dump.
        payload = b'{"output":' + to_json(output) + b"}"
    except PydanticSerializationError:
        raise Internal("the handler produced a result that is not JSON") from None
    return request.encode_json(Kind.RESULT, payload)
