"""The service entry helper: connect, subscribe in a queue group, decode, guard, handle, reply.

This is the per-message hot path of every service, written directly on nats-py. FastStream's
subscriber machinery measured 4-10x the CPU of a plain nats-py hop here (NATS-NOTES.md), so the
services use this lean dispatcher and FastStream describes the same operations as AsyncAPI
(``services/runtime/asyncapi.py``). One table of :class:`Operation` feeds both.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError, from_json, to_json

from contracts import subjects
from contracts.envelope import (
    MAX_MESSAGE_BYTES,
    Envelope,
    ErrorInfo,
    FollowEncoder,
    Kind,
    Result,
    RunEvent,
    envelope_of,
)
from contracts.errors import CorralError, DeadlineExceeded, ErrorCode, Internal, InvalidRequest, error_for
from services.runtime import connection
from services.runtime import loop as event_loop
from services.runtime.audit import AuditTrail
from services.runtime.guard import check_reply, check_tenant
from services.runtime.liveness import Liveness
from services.runtime.logging import configure_logging
from services.runtime.requests import Requester
from services.runtime.settings import Settings
from services.runtime.state import service_credentials

P = TypeVar("P", bound=BaseModel)
# Refusals that are attempts on the isolation layers, not just malformed input.
AUDITED_REFUSALS = frozenset({ErrorCode.TENANT_MISMATCH, ErrorCode.FORBIDDEN, ErrorCode.UNAUTHORIZED})
Handler = Callable[["Request[Any]"], Awaitable[Any]]
# A handler's return value when it passed the request on with its reply subject: the next hop
# answers the requester directly, so this service sends no reply of its own.
FORWARDED: Any = object()


@dataclass(frozen=True)
class Operation:
    """One subscription of a service: subject pattern, expected kind and payload, reply type."""

    subject: str
    kind: Kind
    payload: type[BaseModel]
    summary: str
    handler: Handler
    # Tenant-facing operations only accept the tenant's own inbox as a reply subject.
    tenant_facing: bool = False
    reply: type[BaseModel] = Result


class Request(Generic[P]):
    """What a handler receives: the validated envelope, the tenant from the subject, the service."""

    __slots__ = (
        "_encoder",
        "_events_subject",
        "_log",
        "_until",
        "envelope",
        "reply",
        "service",
        "size",
        "stream",
        "subject",
        "tenant",
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
    ) -> None:
        self.envelope = envelope
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
            self._log = self.service.log.bind(tenant_id=self.tenant, run_id=self.envelope.run_id)
        return self._log

    def encode(self, kind: Kind, payload: BaseModel) -> bytes:
        """An envelope following this request (same tenant, run, deadline, trace), as bytes."""
        return self.encode_json(kind, payload.model_dump_json().encode())

    def encode_json(self, kind: Kind, payload: bytes) -> bytes:
        """The same, with the payload already serialised (the JSON of a valid payload)."""
        if self._encoder is None:
            self._encoder = FollowEncoder(self.envelope, self._until)
        return self._encoder.encode_json(kind, payload)

    def audit(self, action: str, outcome: str, **detail: Any) -> None:
        """Append a record about this request to the tenant's audit trail (written in the background)."""
        self.service.audit.record(
            self.tenant, action, outcome, principal=self.envelope.principal, run_id=self.envelope.run_id, **detail
        )

    def with_run_id(self, run_id: str) -> Request[P]:
        """The same request with a run id assigned (when the client did not choose one)."""
        envelope = self.envelope.model_copy(update={"run_id": run_id})
        request = Request(envelope, self.tenant, self.subject, self.service, self.size, self.reply, self._until)
        request.stream = self.stream
        return request

    async def emit(self, event: RunEvent) -> None:
        """Publish a progress event on ``t.<tenant>.events.<run_id>`` (if the run has an id)."""
        if self.envelope.run_id is None or not self.stream:
            return
        if self._events_subject is None:
            self._events_subject = subjects.events(self.tenant, self.envelope.run_id)
        await self.service.nc.publish(self._events_subject, self.encode(Kind.EVENT, event))

    async def call_json(self, subject: str, kind: Kind, payload: bytes, *, timeout: float | None = None) -> Any:
        """Request another service with an envelope that follows this one and carries ``payload``
        (the JSON of a valid payload: handlers write it directly); returns the reply's output."""
        remaining = self.remaining(self.service.settings.default_timeout_s)
        limit = remaining if timeout is None else min(timeout, remaining)
        if limit <= 0:
            raise DeadlineExceeded("deadline passed before the call")
        return await self.service.request(subject, self.encode_json(kind, payload), timeout=limit)

    async def forward_json(self, subject: str, kind: Kind, payload: bytes) -> Any:
        """Pass the request on to another service, which answers the requester directly.

        The envelope follows this one (same tenant, run and deadline), carries ``payload`` (the
        JSON of a valid payload) and keeps the requester's reply subject, so the answer skips this
        hop on its way back. If nothing serves ``subject``, the broker's no-responders status goes
        to this connection, not to the requester: callers check that a service is running first
        (``Service.watch``).
        """
        if self.remaining(1.0) <= 0:
            raise DeadlineExceeded("deadline passed before the request could be passed on")
        await self.service.nc.publish(subject, self.encode_json(kind, payload), reply=self.reply)
        return FORWARDED


class Slots:
    """A counting semaphore that can also be taken without waiting (asyncio's cannot), for the
    read loop's direct dispatch. A slot given back goes to the longest waiter first."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_take(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.try_take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            else:  # handed a slot as it was cancelled: pass it on
                self.give()
            raise

    def give(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the waiter
                return
        self._free += 1


class Service:
    """A Corral service process: one NATS connection, a few operations, graceful shutdown."""

    def __init__(self, name: str, settings: Settings | None = None, *, ping: bool = True, audit: bool = True) -> None:
        self.name = name
        self.ping = ping
        self.audit_enabled = audit
        # Subscriptions that carry no envelope (the auth callout): (subject, callback).
        self.raw_subscriptions: list[tuple[str, Callable[[Msg], Awaitable[None]]]] = []
        self.settings = settings or Settings()
        self.log = configure_logging(name, fmt=self.settings.log_format, level=self.settings.log_level)
        self.operations: list[Operation] = []
        self.nc: Client = Client()
        self._subscriptions: list[Any] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = Slots(self.settings.max_in_flight)
        self._stopping = asyncio.Event()
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self.audit = AuditTrail(self.nc, name, self.log)  # replaced on start, with the live connection
        self.requester = Requester(self.nc)  # likewise
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self.watched: dict[str, Liveness] = {}

    # ---- declaration -----------------------------------------------------------------

    def operation(
        self,
        subject: str,
        kind: Kind,
        payload: type[BaseModel],
        summary: str,
        *,
        tenant_facing: bool = False,
        reply: type[BaseModel] = Result,
    ) -> Callable[[Handler], Handler]:
        """Declare a handler for ``subject`` (a ``t.*...`` pattern) taking ``Envelope[payload]``."""

        def register(handler: Handler) -> Handler:
            self.operations.append(Operation(subject, kind, payload, summary, handler, tenant_facing, reply))
            return handler

        return register

    def on_start(self, setup: Callable[[], Awaitable[None]]) -> None:
        """Run ``setup`` (connect to MCP servers, ...) after connecting, before taking messages."""
        self._on_start.append(setup)

    def on_stop(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Run ``cleanup`` (close HTTP clients, ...) once in-flight messages are done."""
        self._on_stop.append(cleanup)

    def watch(self, other: str) -> Liveness:
        """Keep track of whether any replica of service ``other`` is running (probed while running)."""
        liveness = self.watched[other] = Liveness(other, self.settings.probe_interval_s)

        async def start() -> None:
            liveness.start(self.nc)

        self.on_start(start)
        self.on_stop(liveness.stop)
        return liveness

    # ---- lifecycle -------------------------------------------------------------------

    def credentials(self) -> tuple[str | None, str | None]:
        settings = self.settings
        if settings.nats_user:
            return settings.nats_user, settings.nats_password
        if settings.state_dir is not None:
            return service_credentials(settings.state_dir, self.name)
        return None, None

    async def connect(self) -> None:
        user, password = self.credentials()
        self.nc = await connection.connect(
            self.settings.nats_url,
            user=user,
            password=password,
            name=f"corral-{self.name}",
            inbox_prefix=subjects.service_inbox_prefix(self.name).encode(),
            error_cb=self._on_error,
            max_reconnect_attempts=-1,
            pending_size=8 * 1024 * 1024,
        )

    async def start(self) -> None:
        """Connect and subscribe every operation in the queue group named after the service."""
        await self.connect()
        if isinstance(self.nc, connection.Connection):
            self.nc.quiet = lambda: len(self._in_flight) <= 1
        self.requester = Requester(self.nc)
        await self.requester.start()
        self.audit = AuditTrail(self.nc, self.name, self.log)
        if self.audit_enabled:
            await self.audit.start()
        for setup in self._on_start:
            await setup()
        for op in self.operations:
            handle = self._handler_of(op)
            sub = await self.nc.subscribe(
                op.subject, queue=self.name, cb=self._tracked(handle), pending_msgs_limit=65536
            )
            if isinstance(self.nc, connection.Connection):
                self.nc.dispatch_directly(sub, self._direct(handle))
            self._subscriptions.append(sub)
        for subject, raw_callback in self.raw_subscriptions:
            self._subscriptions.append(
                await self.nc.subscribe(subject, queue=self.name, cb=self._tracked(raw_callback))
            )
        if self.ping:
            self._subscriptions.append(await self.nc.subscribe(subjects.ping(self.name), cb=self._on_ping))
        # nats-py 2.16 writes a flush's PING ahead of SUBs still queued: the second round trip
        # follows them, so the subscriptions exist before the service says it is ready.
        await self.nc.flush()
        await self.nc.flush()
        self.log.info("service_ready", subjects=[op.subject for op in self.operations], pid=os.getpid())

    async def stop(self) -> None:
        """Stop taking messages, finish those in flight, then close the connection."""
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                # drain, not unsubscribe: messages the server already handed to this replica (its
                # queue-group share) are still dispatched instead of being dropped.
                await sub.drain()
        self._subscriptions.clear()
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=self.settings.drain_timeout_s)
            for task in pending:
                task.cancel()
        await self.audit.stop()
        with contextlib.suppress(Exception):
            await self.requester.stop()
        for cleanup in self._on_stop:
            with contextlib.suppress(Exception):
                await cleanup()
        with contextlib.suppress(Exception):
            await self.nc.drain()
        self.log.info("service_stopped")

    async def run(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self.start()
        await self._stopping.wait()
        await self.stop()

    # ---- bus helpers -----------------------------------------------------------------

    async def request(self, subject: str, body: bytes, *, timeout: float) -> Any:
        """Send an encoded envelope and return the reply's output, raising the typed error it carries."""
        try:
            msg = await self.requester.request(subject, body, timeout)
        except NatsTimeout:
            raise DeadlineExceeded(f"no reply on {subject} within {timeout:.1f}s") from None
        except NoRespondersError:
            raise Internal(f"no service is serving {subject}") from None
        return decode_reply(msg.data)

    # ---- the hot path ----------------------------------------------------------------

    def _handler_of(self, op: Operation) -> Callable[[Msg], Awaitable[None]]:
        envelope_type = envelope_of(op.payload)
        return lambda msg: self._dispatch(op, envelope_type, msg)

    def _tracked(self, handle: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
        """Run each message in its own task, bounded by ``max_in_flight``, tracked for shutdown."""

        async def on_message(msg: Msg) -> None:
            await self._slots.take()  # at the limit, waits: later messages queue on the subscription
            self._start(handle, msg)

        return on_message

    def _direct(self, handle: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], bool]:
        """The same from the read loop (``Connection.dispatch_directly``): declines at the limit."""

        def take(msg: Msg) -> bool:
            if not self._slots.try_take():
                return False
            self._start(handle, msg)
            return True

        return take

    def _start(self, handle: Callable[[Msg], Awaitable[None]], msg: Msg) -> None:
        task = asyncio.create_task(handle(msg))
        self._in_flight.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.give()

    async def _dispatch(self, op: Operation, envelope_type: type[Envelope[Any]], msg: Msg) -> None:
        tenant = None
        envelope = None
        try:
            parsed = subjects.parse(msg.subject)
            tenant = parsed.tenant
            check_reply(msg.reply, tenant, allow_service_inbox=not op.tenant_facing)
            envelope = decode_request(msg.data, envelope_type)
            check_tenant(envelope.tenant_id, tenant)
            if envelope.kind != op.kind:
                raise InvalidRequest(f"expected a {op.kind.value} envelope, got {envelope.kind.value}")
            request = Request(envelope, tenant, parsed, self, len(msg.data), msg.reply)
            if request.remaining(1.0) <= 0:
                raise DeadlineExceeded("the request's deadline has passed")
            output = await op.handler(request)
            if msg.reply and output is not FORWARDED:
                await self.nc.publish(msg.reply, _encode_result(request, output))
        except CorralError as error:
            await self._refuse(msg, tenant, envelope, error)
        except Exception:
            self.log.exception("handler_failed", subject=msg.subject, tenant_id=tenant)
            await self._refuse(msg, tenant, envelope, Internal("internal error"))

    async def _refuse(self, msg: Msg, tenant: str | None, envelope: Envelope[Any] | None, error: CorralError) -> None:
        """Log a refusal and answer it with a typed error where a reply is possible and safe."""
        self.log.warning(
            "refused", subject=msg.subject[:200], tenant_id=tenant, code=error.code.value, reason=error.message
        )
        if (
            tenant is not None
            and error.code in AUDITED_REFUSALS
            and self.audit_enabled
            and not error.remote
            and not error.audited
        ):
            self.audit.record(
                tenant,
                "guard_refused",
                "refused",
                principal=envelope.principal if envelope else None,
                run_id=envelope.run_id if envelope else None,
                code=error.code.value,
                reason=error.message,
                subject=msg.subject[:200],
            )
        if not msg.reply or tenant is None:
            return
        try:
            check_reply(msg.reply, tenant, allow_service_inbox=True)
        except CorralError:
            return  # never answer into another tenant's inbox
        info = ErrorInfo.of(error)
        if envelope is not None:
            body = FollowEncoder(envelope).encode(Kind.ERROR, info)
        else:
            body = envelope_of(ErrorInfo)(kind=Kind.ERROR, tenant_id=tenant, payload=info).model_dump_json().encode()
        with contextlib.suppress(Exception):
            await self.nc.publish(msg.reply, body)

    async def _on_ping(self, msg: Msg) -> None:
        if msg.reply:
            body = {"service": self.name, "pid": os.getpid(), "in_flight": len(self._in_flight)}
            await self.nc.publish(msg.reply, json.dumps(body).encode())

    async def _on_error(self, error: Exception) -> None:
        self.log.warning("nats_error", error=str(error))


def _encode_result(request: Request[Any], output: Any) -> bytes:
    """The reply to a request; a handler output that is not JSON is the handler's error, not a crash."""
    if isinstance(output, Result):
        output = output.output
    try:
        # Straight to JSON (the Result payload is just its output): a third of a model dump.
        payload = b'{"output":' + to_json(output) + b"}"
    except PydanticSerializationError:
        raise Internal("the handler produced a result that is not JSON") from None
    return request.encode_json(Kind.RESULT, payload)


def decode_request(data: bytes, envelope_type: type[Envelope[Any]]) -> Envelope[Any]:
    """Validate a request body; errors name the fields, never echo the body."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise InvalidRequest(f"message of {len(data)} bytes is over the {MAX_MESSAGE_BYTES} byte limit")
    try:
        return envelope_type.model_validate_json(data)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid envelope: {_describe(exc)}") from None


def decode_reply(data: bytes) -> Any:
    """The output of a result envelope, or the typed error an error envelope carries.

    Replies are parsed as plain JSON with a check of the two fields used, not a full envelope
    validation: they come from Corral's own services and this runs once per hop.
    """
    try:
        reply = from_json(data)  # pydantic-core's parser: half the time of json.loads here
        kind = reply["kind"]
        payload = reply["payload"]
        if kind == Kind.ERROR:
            info = ErrorInfo.model_validate(payload)
        elif kind == Kind.RESULT and isinstance(payload, dict):
            return payload.get("output")
        else:
            raise ValueError(kind)
    except (ValueError, KeyError, TypeError, ValidationError):
        raise Internal("unreadable reply") from None
    error = error_for(info.code, info.message)
    error.remote = True  # raised by the service that replied (which already reported it)
    raise error


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def catalog_service(name: str, register: Callable[[Service, Any], Any]) -> Callable[[Settings], Service]:
    """The ``build`` of a service whose operations come from the definitions (router, graph, tools)."""
    from services.runtime.catalog import load_catalog

    def build(settings: Settings) -> Service:
        service = Service(name, settings)
        register(service, load_catalog(settings.definitions))
        return service

    return build


def run_service(build: Callable[[Settings], Service]) -> None:
    """Entry point of a service's ``__main__``: build it from settings and run it."""
    service = build(Settings())
    with contextlib.suppress(KeyboardInterrupt):
        event_loop.run(service.run())
    structlog.get_logger().debug("exit")
