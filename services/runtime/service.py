"""The service runtime: connect, subscribe what the manifest declares, decode, guard, handle, reply.

This is the per-message hot path of every service, written directly on nats-py. FastStream's
subscriber machinery measured 4-10x the CPU of a plain nats-py hop here (NATS-NOTES.md), so the
services use this lean dispatcher; FastStream describes the same declarations as AsyncAPI
(``corral/asyncapi.py``). What a service consumes is declared once, in its manifest
(``services/runtime/manifest.py``); its handlers are bound to those declarations by name.

Every replica also answers ``corral.ping.<service>`` (readiness) and ``corral.stats.<service>``
(per-operation, per-tenant statistics, ``services/runtime/stats.py``) when it lives in the
tenants' account.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import (
    ConnectionClosedError,
    ConnectionReconnectingError,
    NoRespondersError,
    StaleConnectionError,
)
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import (
    APIError,
    BadRequestError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from pydantic import ValidationError

from contracts import subjects
from contracts.definitions import Catalog, ConnectionLimits, TenantPolicy
from contracts.definitions_base import DefinitionError
from contracts.envelope import (
    MAX_MESSAGE_BYTES,
    Envelope,
    ErrorInfo,
    EventType,
    FollowEncoder,
    Kind,
    RunEvent,
    envelope_of,
    new_envelope_json,
    new_id,
)
from contracts.errors import (
    CorralError,
    DeadlineExceeded,
    ErrorCode,
    Forbidden,
    Internal,
    InvalidRequest,
    RateLimited,
    Unavailable,
)
from contracts.replies import decode_reply
from contracts.tenants import is_tenant_id
from contracts.traceparent import new_traceparent
from contracts.traceparent import unusable as unusable_trace
from services.runtime import connection, tracing
from services.runtime import loop as event_loop
from services.runtime.audit import AuditTrail
from services.runtime.credentials import service_credentials
from services.runtime.fairness import Admission, FairShare
from services.runtime.guard import ReplyOutsideInbox, check_reply, check_tenant, reply_allowed
from services.runtime.liveness import LEAVING_GRACE_S, Liveness, Replicas
from services.runtime.logging import RunLog, configure_logging, replica_name
from services.runtime.manifest import Consume, Durable, Manifest, Operation, Raw
from services.runtime.pull import PullConsumer
from services.runtime.refusals import Refusals
from services.runtime.request import FORWARDED, Request, encode_result
from services.runtime.requests import ReplyLost, Requester
from services.runtime.settings import Settings
from services.runtime.slots import Slots
from services.runtime.stats import UNKNOWN, OperationStats, ServiceStats, parse_stats_request
from services.runtime.tasks import keep_cancelling
from services.runtime.tenant_registry import LiveTenants

Handler = Callable[[Request[Any]], Awaitable[Any]]
# A raw handler may return (tenant, error code) for the statistics.
RawHandler = Callable[[Msg], Awaitable[tuple[str | None, str | None] | None]]
# Messages a durable consumer pulls at once (bounded by the free in-flight slots as well).
DURABLE_BATCH = 64
DEFAULT_PAYLOAD_LIMIT = ConnectionLimits().max_payload_bytes
# Refusals answered per loop turn before the refusing task lets other work run (see _refuse_due).
REFUSALS_PER_TURN = 16
# When a durable message whose handler failed (retryably, or with a bug) comes back.
DURABLE_RETRY_S = 1.0
# What a handler's call to the broker or JetStream raises when it cannot answer for a moment.
BROKER_TRANSIENT = (
    NoRespondersError,
    NatsTimeout,
    ConnectionClosedError,
    ConnectionReconnectingError,
    StaleConnectionError,
    ServiceUnavailableError,
    NoStreamResponseError,
)
# How much longer than its drain timeout a replica may take to stop (Service.stop).
STOP_MARGIN_S = 3.0

__all__ = ["FORWARDED", "Request", "Service", "catalog_service", "run_service"]


class Service:
    """A Corral service process: one NATS connection, the manifest's operations, graceful shutdown."""

    def __init__(self, manifest: Manifest, settings: Settings | None = None) -> None:
        self.manifest = manifest
        self.name = manifest.name
        self.settings = settings or manifest.settings()
        # Its name in logs and ping answers: graph-2 (the index corral up gives it), else its pid.
        self.replica_name = replica_name(self.name, self.settings.replica, os.getpid(), socket.gethostname())
        self.log = configure_logging(
            self.name, fmt=self.settings.log_format, level=self.settings.log_level, replica=self.replica_name
        )
        # The one info line per finished run, written by the executors (graph, workflow).
        self.runs = RunLog(
            self.log, self.settings.log_runs, self.settings.log_level, service=self.name, replica=self.replica_name
        )
        self.audit_enabled = manifest.audit and manifest.in_app
        self.nc: Client = Client()
        self.stats = ServiceStats(self.name, replica_id=new_id())
        self.handlers: dict[str, Any] = {}
        self._subscriptions: list[Any] = []
        self._ping: Any = None  # the ping subscription, the first to go when stopping
        self._consumers: list[asyncio.Task[None]] = []
        self._pulls: list[PullConsumer] = []  # the durable consumers' pulls, while they run
        # Each message's task -> the tenant it was admitted for (None: not admitted per tenant).
        self._in_flight: dict[asyncio.Task[None], str | None] = {}
        self._kept: set[asyncio.Task[Any]] = set()
        self._slots = Slots(self.settings.max_in_flight)
        # Waiting messages: (how to handle it, the message, whether its operation is tenant-facing).
        self._fair: FairShare[tuple[Callable[[Msg], Awaitable[None]], Msg, bool]] = FairShare(
            self._slots,
            per_tenant=self.settings.max_in_flight_per_tenant,
            queue_per_tenant=self.settings.max_queued_per_tenant,
            queue_total=self.settings.max_queued,
        )
        # A check of the tenant before anything is decoded (the router's rate limit): returns the
        # refusal, or None to go on. Runs in the read loop: it must be cheap and must not block.
        self.admission: Callable[[str], CorralError | None] | None = None
        # Whether a tenant's users are scoped to their own principal (its policy; the router
        # knows it): a tenant-facing message's reply must then be its principal's own inbox.
        self.principal_scoped: Callable[[str], bool] = lambda tenant: False
        # The largest message a tenant may publish to a tenant-facing operation (its policy's
        # connection.max_payload_bytes: the broker does not apply the user JWT's limit to callout
        # users). Checked at admission, before anything is decoded.
        self.payload_limit: Callable[[str], int] = lambda tenant: DEFAULT_PAYLOAD_LIMIT
        # The tenants it serves, following the registry (:meth:`follow_tenants`); None: not followed.
        self.tenants: LiveTenants | None = None
        # Whether a tenant-facing request refused for its reply subject is told so on its run's
        # events instead (the router's requests: :meth:`_report_misdirected`).
        self.misdirected_to_events = False
        self.refusals = Refusals(self.log, None)
        self._refusing: set[asyncio.Task[None]] = set()
        self._refusals_due: list[tuple[Msg, CorralError, bool]] = []
        self._operations_by_sid: dict[int, tuple[Consume, OperationStats]] = {}
        self._stopping = asyncio.Event()
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self._on_draining: list[Callable[[], None]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self.audit = AuditTrail(self.nc, self.name, self.log)  # replaced on start, with the live connection
        self.requester = Requester(self.nc)  # likewise
        # Whether any replica of each watched service is running (probed while this one runs).
        self.watched: dict[str, Liveness] = {
            other: Liveness(other, self.settings.probe_interval_s) for other in manifest.watches
        }
        # How many replicas of this service run (1 until counted, and when it does not count).
        self.replicas = Replicas(self.name, self.settings.probe_interval_s)
        # Spans (CORRAL_TRACES): None when off, and then no OpenTelemetry code runs.
        self.tracing = tracing.start(self.name, self.settings.traces)

    # ---- binding handlers to the manifest ----------------------------------------------

    def handler(self, name: str) -> Callable[[Any], Any]:
        """Bind the decorated function to the manifest's operation ``name``.

        An envelope operation's handler takes a :class:`Request` and returns the reply's output
        (or :data:`FORWARDED`); a raw operation's handler takes the ``Msg``.
        """
        self.manifest.operation(name)  # a name the manifest does not declare fails here, at wiring

        def bind(function: Any) -> Any:
            if name in self.handlers:
                raise ValueError(f"service {self.name!r} binds operation {name!r} twice")
            self.handlers[name] = function
            return function

        return bind

    def on_start(self, setup: Callable[[], Awaitable[None]]) -> None:
        """Run ``setup`` (connect to MCP servers, ...) after connecting, before taking messages."""
        self._on_start.append(setup)

    def on_draining(self, notice: Callable[[], None]) -> None:
        """Call ``notice`` when the replica starts stopping, before it waits for what is in flight
        (the workflow driver then starts no new step)."""
        self._on_draining.append(notice)

    def keep(self, task: asyncio.Task[Any]) -> None:
        """Work a handler goes on with after its reply (a workflow run driven from its start):
        a stopping replica waits for it as for a message in flight (up to the drain timeout,
        after notifying :meth:`on_draining`), then cancels it."""
        self._kept.add(task)
        task.add_done_callback(self._kept.discard)

    def on_stop(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """Run ``cleanup`` (close HTTP clients, ...) once in-flight messages are done."""
        self._on_stop.append(cleanup)

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
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            max_reconnect_attempts=-1,
            reconnect_to_server_handler=connection.quick_reconnects(first_s=0.0, most_s=1.0),
            pending_size=8 * 1024 * 1024,
        )

    async def _on_disconnected(self) -> None:
        # A reply on its way now is lost: the requests waiting for one fail at once (retryable).
        self.requester.connection_lost()

    async def _on_reconnected(self) -> None:
        for pull in self._pulls:  # their pull requests stayed with the old connection
            pull.reconnected()

    async def start(self) -> None:
        """Connect and subscribe every operation of the manifest (core ones in the queue group
        named after the service), then the ping and statistics subjects."""
        unbound = [op.name for op in self.manifest.consumes if op.name not in self.handlers]
        if unbound:
            raise RuntimeError(f"service {self.name!r} has no handler for operations {unbound}")
        await self.connect()
        if isinstance(self.nc, connection.Connection):
            self.nc.quiet = lambda: len(self._in_flight) <= 1
        self.requester = Requester(self.nc)
        if self.manifest.requests:  # its inbox subscription, only where replies are expected
            await self.requester.start()
        self.audit = AuditTrail(self.nc, self.name, self.log)
        if self.audit_enabled:
            await self.audit.start()
        self.refusals = Refusals(self.log, self.audit if self.audit_enabled else None)
        for liveness in self.watched.values():
            await liveness.listen(self.nc)
            liveness.start(self.nc)
        for setup in self._on_start:
            await setup()
        for op in self.manifest.consumes:
            await self._subscribe(op)
        if self.manifest.in_app:
            self._ping = await self.nc.subscribe(subjects.ping(self.name), cb=self.answer_ping)
            self._subscriptions.append(self._ping)
            if self.manifest.counts_replicas:
                self.replicas.start(self.nc)
            self._subscriptions.append(await self.nc.subscribe(subjects.stats(self.name), cb=self.answer_stats))
        # nats-py 2.16 writes a flush's PING ahead of SUBs still queued: the second round trip
        # follows them, so the subscriptions exist before the service says it is ready.
        await self.nc.flush()
        await self.nc.flush()
        self.log.info("service_ready", operations=[op.subject for op in self.manifest.consumes], pid=os.getpid())

    async def _subscribe(self, op: Operation) -> None:
        stats = self.stats.operation(op.name, op.subject, self.name)
        handler = self.handlers[op.name]
        if isinstance(op, Raw):
            raw = self._raw(handler, stats)
            self._subscriptions.append(await self.nc.subscribe(op.subject, queue=self.name, cb=self._tracked(raw)))
            return
        envelope_type = envelope_of(op.payload)
        if isinstance(op, Durable):
            self._consumers.append(
                asyncio.create_task(self._consume(op, envelope_type, handler, stats), name=f"consume-{op.name}")
            )
            return

        def handle(msg: Msg) -> Awaitable[None]:
            return self._dispatch(op, envelope_type, handler, stats, msg, msg.reply)

        def admit(msg: Msg) -> bool:
            self._admit(op, handle, stats, msg)
            return True  # taken: started, queued for its tenant, or refused

        async def on_message(msg: Msg) -> None:  # nats-py's queued path (shortcuts off)
            self._admit(op, handle, stats, msg)

        sub = await self.nc.subscribe(op.subject, queue=self.name, cb=on_message, pending_msgs_limit=65536)
        if isinstance(self.nc, connection.Connection):
            self.nc.dispatch_directly(sub, admit)
            self._operations_by_sid[sub._id] = (op, stats)
            self.nc.on_unreadable = self._answer_unreadable
        self._subscriptions.append(sub)

    async def stop(self) -> None:
        """Stop taking messages, finish those in flight, then close the connection: within
        ``drain_timeout_s`` + :data:`STOP_MARGIN_S` in all (``corral up`` waits that long, then
        kills). The messages in flight get ``drain_timeout_s``; the rest (abandoned ones
        answering, the audit writer's last records) what remains of the margin."""
        until = time.monotonic() + self.settings.drain_timeout_s + STOP_MARGIN_S

        def left(least: float) -> float:
            return max(least, until - time.monotonic())

        await self._say_leaving()
        for notice in self._on_draining:
            notice()
        for consumer in self._consumers:  # a fetch can lose one cancellation (services/runtime/tasks.py)
            keep_cancelling(consumer)
        for consumer in self._consumers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await consumer
        self._consumers.clear()
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):
                # drain, not unsubscribe: messages the server already handed to this replica (its
                # queue-group share) are still dispatched instead of being dropped.
                await sub.drain()
        self._subscriptions.clear()
        stopping = Unavailable(f"the {self.name} replica is stopping; it may be retried")
        for _, (_, msg, tenant_facing) in self._fair.drain():  # waiting for their turn: never started
            self._refuse_soon(msg, stopping, tenant_facing)
        if self._refusing:
            await asyncio.wait(set(self._refusing))
        if self._in_flight or self._kept:
            working = [*self._in_flight, *self._kept]
            _, pending = await asyncio.wait(working, timeout=self.settings.drain_timeout_s)
            if pending:
                self.log.warning(
                    "in_flight_abandoned", count=len(pending), drain_timeout_s=self.settings.drain_timeout_s
                )
            for task in pending:
                task.cancel()  # each answers its requester with `unavailable` (_abandon)
            if pending:
                await asyncio.wait(pending, timeout=min(1.0, left(0.1)))
        self.refusals.close_window()
        await self.audit.stop(timeout=left(0.5))
        with contextlib.suppress(Exception):
            await self.requester.stop()
        for liveness in self.watched.values():
            await liveness.stop()
        await self.replicas.stop()
        for cleanup in self._on_stop:
            with contextlib.suppress(Exception):
                await cleanup()
        with contextlib.suppress(Exception):
            await self.nc.drain()
        if self.tracing is not None:
            self.tracing.shutdown()  # exports what is still batched
        self.log.info("service_stopped")

    async def _say_leaving(self) -> None:
        """Before it stops taking messages: stop answering pings, tell the services that pass
        requests on to this one (``corral.leaving.<service>``, a request each of them answers
        once it has taken note), and, if any does, go on taking messages until
        :data:`~services.runtime.liveness.LEAVING_GRACE_S` has passed, while they look again
        whether another replica is left (services/runtime/liveness.py). Without it, the last
        replica of an executor stopping left its router passing requests on to nobody until its
        next probe, up to a second, and their clients waited out their deadlines."""
        if self._ping is None:
            return
        ping, self._ping = self._ping, None
        started = time.monotonic()
        try:
            await ping.unsubscribe()
            self._subscriptions.remove(ping)
            await self.nc.request(subjects.leaving(self.name), b"", timeout=LEAVING_GRACE_S)
        except Exception:  # no responders (nothing watches this service), no answer in time, or no connection
            return
        await asyncio.sleep(max(0.0, LEAVING_GRACE_S - (time.monotonic() - started)))

    async def flushed(self, timeout: float = 10.0) -> None:
        """Write what was counted and recorded so far to the audit trail now (tests, shutdown)."""
        self.refusals.close_window()
        if self.audit_enabled:
            await self.audit.flushed(timeout)

    async def run(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self.start()
        event_loop.settle_gc()  # what it loaded to start (definitions, tools, caches) stays
        await self._stopping.wait()
        await self.stop()

    # ---- bus helpers -----------------------------------------------------------------

    async def request(self, subject: str, body: bytes, *, timeout: float) -> Any:
        """Send an encoded envelope and return the reply's output, raising the typed error it carries."""
        try:
            msg = await self.requester.request(subject, body, timeout)
        except ReplyLost:
            raise Unavailable(f"the connection to the broker dropped while waiting for a reply on {subject}") from None
        except NatsTimeout:
            raise DeadlineExceeded(f"no reply on {subject} within {timeout:.1f}s") from None
        except NoRespondersError:
            raise Unavailable(f"no service is serving {subject}") from None
        return decode_reply(msg.data)

    # ---- the hot path ----------------------------------------------------------------

    def _tracked(self, handle: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
        """Run each message of a raw operation in its own task, bounded by ``max_in_flight``."""

        async def on_message(msg: Msg) -> None:
            await self._slots.take()  # at the limit, waits: later messages queue on the subscription
            self._start(handle, msg, None)

        return on_message

    def follow_tenants(
        self, catalog: Catalog, connection: Callable[[], Any] | None = None, live: LiveTenants | None = None
    ) -> LiveTenants:
        """Serve ``catalog``'s tenants overlaid by the tenant registry's, following its changes
        (services/runtime/tenant_registry.py). The service starts serving once the registry was
        read (at most ``CORRAL_REGISTRY_WAIT_S``; then with the files' tenants, and the registry's
        as they arrive). ``connection``: where to follow it (default: the service's own), asked
        for when the service starts, after the start-up steps registered before this call."""
        live = live or LiveTenants(catalog, self.log)
        self.tenants = live
        self.apply_tenant_policies(catalog.tenants)
        live.on_change(lambda current, _: self.apply_tenant_policies(current.tenants))

        async def start() -> None:
            live.start(connection() if connection is not None else self.nc)
            if not await live.ready(self.settings.registry_wait_s):
                self.log.warning("tenant_registry_not_read", waited_s=self.settings.registry_wait_s)

        async def stop() -> None:
            live.stop()

        self.on_start(start)
        self.on_stop(stop)
        return live

    def apply_tenant_policies(self, tenants: Mapping[str, TenantPolicy]) -> None:
        """Take from each tenant's policy what dispatch needs: whether its users are kept apart
        (:attr:`principal_scoped`) and the largest message it may publish (:attr:`payload_limit`)."""
        scoped = frozenset(tenant for tenant, policy in tenants.items() if policy.principal_scoped)
        self.principal_scoped = scoped.__contains__
        limits = {
            tenant: policy.connection.max_payload_bytes
            for tenant, policy in tenants.items()
            if policy.connection.max_payload_bytes != DEFAULT_PAYLOAD_LIMIT
        }
        self.payload_limit = lambda tenant: limits.get(tenant, DEFAULT_PAYLOAD_LIMIT)

    def _admit(self, op: Consume, handle: Callable[[Msg], Awaitable[None]], stats: OperationStats, msg: Msg) -> None:
        """Admit one message by its subject's tenant alone, before anything is decoded: start it,
        queue it behind its own tenant's, or refuse it at once."""
        tenant = subjects.tenant_token(msg.subject)
        if op.tenant_facing and len(msg.data) > (limit := self.payload_limit(tenant)):
            stats.refuse(tenant, ErrorCode.INVALID_REQUEST.value)
            error = InvalidRequest(
                f"a message of {len(msg.data)} bytes is over the tenant's limit of {limit} "
                "(connection.max_payload_bytes)"
            )
            self._refuse_soon(msg, error, op.tenant_facing)
            return
        if self.admission is not None:
            refusal = self.admission(tenant)
            if refusal is not None:
                stats.refuse(tenant, refusal.code.value)
                self._refuse_soon(msg, refusal, op.tenant_facing)
                return
        verdict = self._fair.admit(tenant, (handle, msg, op.tenant_facing))
        if verdict is Admission.START:
            self._start(handle, msg, tenant)
        elif verdict is Admission.FULL:
            stats.refuse(tenant, ErrorCode.RATE_LIMITED.value)
            error = RateLimited(f"too many requests of this tenant in flight on {self.name}")
            self._refuse_soon(msg, error, op.tenant_facing)

    def _start(self, handle: Callable[[Msg], Awaitable[None]], msg: Msg, tenant: str | None) -> None:
        task = asyncio.create_task(handle(msg))
        self._in_flight[task] = tenant
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._release(self._in_flight.pop(task, None))

    def _release(self, tenant: str | None) -> None:
        """A slot is given back: it goes to the next tenant waiting for one, else it is free."""
        following = self._fair.release(tenant)
        if following is not None:
            name, (handle, msg, _) = following
            self._start(handle, msg, name)

    def _answer_unreadable(self, sid: int, subject: bytes, reply: bytes) -> None:
        """A message of one of this service's operations that the connection could not read (it
        was dropped and counted there): answered with a typed error, like any other refusal,
        where its subject and reply subject can be read."""
        found = self._operations_by_sid.get(sid)
        if found is None or not reply:
            return
        try:
            text_subject, text_reply = subject.decode(), reply.decode()
        except UnicodeDecodeError:
            return  # nowhere readable to answer
        op, stats = found
        stats.refuse(subjects.tenant_token(text_subject), ErrorCode.INVALID_REQUEST.value)
        unreadable = Msg(_client=self.nc, subject=text_subject, reply=text_reply, data=b"")
        self._refuse_soon(
            unreadable, InvalidRequest("the message could not be read (malformed headers)"), op.tenant_facing
        )

    def _refuse_soon(self, msg: Msg, error: CorralError, tenant_facing: bool) -> None:
        """Refuse a message that was never decoded. From the read loop, so the answers are sent
        by one task per loop turn, for every refusal of the turn (a flood of them costs a list
        append each here, not a task each); none holds a slot."""
        self._refusals_due.append((msg, error, tenant_facing))
        if len(self._refusals_due) == 1:
            task = asyncio.get_running_loop().create_task(self._refuse_due())
            self._refusing.add(task)  # a reference until it is done (the loop keeps only weak ones)
            task.add_done_callback(self._refusing.discard)

    async def _refuse_due(self) -> None:
        due, self._refusals_due = self._refusals_due, []
        bodies: dict[tuple[str, str], bytes] = {}  # the error's JSON, per tenant and message
        for index, (msg, error, tenant_facing) in enumerate(due):
            if index and not index % REFUSALS_PER_TURN:
                # A flood's refusals give way to the requests admitted in the same read: another
                # tenant's request starts after at most this many answers, not after all of them.
                await asyncio.sleep(0)
            subject, reply = msg.subject, msg.reply
            tenant = subjects.tenant_token(subject)
            known = is_tenant_id(tenant)
            self.refusals.add(tenant if known else None, error.code.value, error.message, subject)
            if tenant_facing and known and self.principal_scoped(tenant):  # only the principal's own inbox
                principal = _principal_in(subject)
                allowed = principal is not None and reply_allowed(
                    reply, tenant, allow_service_inbox=False, principal=principal
                )
            else:
                allowed = known and reply_allowed(reply, tenant, allow_service_inbox=not tenant_facing)
            if not reply or not allowed:
                continue  # never answer into another tenant's (or, scoped, another user's) inbox
            key = (error.code.value, error.message)
            payload = bodies.get(key)
            if payload is None:
                payload = bodies[key] = ErrorInfo.of(error).model_dump_json().encode()
            with contextlib.suppress(Exception):
                await self.nc.publish(reply, new_envelope_json(Kind.ERROR, tenant, payload))

    async def _dispatch(
        self,
        op: Consume | Durable,
        envelope_type: type[Envelope[Any]],
        handler: Handler,
        stats: OperationStats,
        msg: Msg,
        reply: str,
    ) -> Request[Any] | None:
        """One message: guard, decode, handle, answer on ``reply`` (the message's reply subject for
        a core operation; none for a durable one, whose reply subject is the broker's ack).
        Returns the request it handled (None: refused before a handler saw it)."""
        tenant = None
        envelope = None
        principal = None
        tenant_facing = getattr(op, "tenant_facing", False)
        try:
            parsed = subjects.parse(msg.subject)
            tenant = parsed.tenant
            if tenant_facing:  # the token after the operation's names the verified principal
                principal = subjects.principal_of(parsed.rest[1]) if len(parsed.rest) > 1 else None
                if principal is None:
                    raise InvalidRequest("the subject does not name a principal")
            check_reply(
                reply,
                tenant,
                allow_service_inbox=not tenant_facing,
                principal=principal if tenant_facing and self.principal_scoped(tenant) else None,
            )
            envelope = decode_request(msg.data, envelope_type)
            check_tenant(envelope.tenant_id, tenant)
            if envelope.kind != op.kind:
                raise InvalidRequest(f"expected a {op.kind.value} envelope, got {envelope.kind.value}")
            if tenant_facing and envelope.principal is not None and envelope.principal != principal:
                raise Forbidden(
                    f"the envelope names principal {envelope.principal[:128]!r} but the connection is {principal!r}"
                )
            request = Request(envelope, tenant, parsed, self, len(msg.data), reply, principal=principal)
            if request.remaining(1.0) <= 0:
                raise DeadlineExceeded("the request's deadline has passed")
        except CorralError as error:
            stats.refuse(tenant, error.code.value)
            if not tenant_facing and envelope is not None:
                principal = envelope.principal  # as the trusted service before this one wrote it
            await self._refuse(msg.subject, reply, tenant, envelope, error, principal, tenant_facing)
            if isinstance(error, ReplyOutsideInbox) and tenant_facing and self.misdirected_to_events:
                await self._report_misdirected(op, envelope_type, msg.data, tenant, principal, error)
            return None
        if tenant_facing and unusable_trace(request.trace):  # a raw client's: its run gets one all the same
            request.trace = new_traceparent()
        traced = self.tracing
        span = None if traced is None else traced.process(request, op.subject, op.name)
        record = stats.start(tenant)
        durable = isinstance(op, Durable)
        started = time.perf_counter()
        failure: str | None = None
        try:
            output = await handler(request)
            if reply and output is not FORWARDED:
                await self.nc.publish(reply, encode_result(request, output))
        except CorralError as error:
            failure = error.code.value
            if durable and error.retryable and request.redeliver is None:
                request.redeliver = DURABLE_RETRY_S  # the work is not done: the broker brings it back
            await self._refuse(msg.subject, reply, tenant, envelope, error, request.principal, tenant_facing)
        except BROKER_TRANSIENT as error:
            # The broker or JetStream could not answer for a moment (a reconnection, a stream's
            # leader being elected on a cluster): typed and retryable, not a bug.
            failure = ErrorCode.UNAVAILABLE.value
            self.log.warning("broker_unavailable", subject=msg.subject, tenant_id=tenant, error=repr(error))
            if durable:
                request.redeliver = DURABLE_RETRY_S
            failed = Unavailable(f"the broker did not answer {self.name} in time ({type(error).__name__}); retry")
            await self._refuse(msg.subject, reply, tenant, envelope, failed, request.principal, tenant_facing)
        except Exception:
            failure = ErrorCode.INTERNAL.value
            self.log.exception("handler_failed", subject=msg.subject, tenant_id=tenant)
            if durable:
                request.redeliver = DURABLE_RETRY_S
            failed = Internal("internal error")
            await self._refuse(msg.subject, reply, tenant, envelope, failed, request.principal, tenant_facing)
        except asyncio.CancelledError:  # given up by a stopping replica (Service.stop)
            failure = ErrorCode.UNAVAILABLE.value
            if not durable:  # a durable message simply goes back to the broker, unacknowledged
                await self._abandon(request, msg.subject, reply, tenant_facing)
            raise
        finally:
            stats.finish(record, time.perf_counter() - started, failure)
            if span is not None:
                traced.finished(span, failure)  # type: ignore[union-attr]
        return request

    async def _report_misdirected(
        self,
        op: Consume | Durable,
        envelope_type: type[Envelope[Any]],
        data: bytes,
        tenant: str | None,
        principal: str | None,
        error: CorralError,
    ) -> None:
        """A request whose reply subject is outside its tenant's inbox (a client connected without
        ``inbox_prefix``) cannot be answered there: its typed error goes out as the ``failed`` event
        of its run instead, on ``t.<tenant>.events.<principal>.<run_id>``, where a client that
        subscribed to its run's events first hears of it (and not only its timeout).

        The subject is the router's own choice: the tenant and the principal are the subject's
        (the broker lets a connection publish requests only as itself) and the run id is the
        envelope's (one token, checked) or a new one, so a request can have this published only
        where its own requests' events go, once per request, and only once its envelope is valid
        and names no other tenant or principal."""
        if tenant is None or principal is None:
            return
        try:
            envelope = decode_request(data, envelope_type)
            check_tenant(envelope.tenant_id, tenant)
        except CorralError:
            return
        if envelope.kind != op.kind or envelope.principal not in (None, principal):
            return
        if not getattr(envelope.payload, "stream", True):  # the client said it does not watch
            return
        run_id = envelope.run_id or new_id()
        cause = envelope if envelope.run_id else envelope.model_copy(update={"run_id": run_id})
        event = RunEvent(
            type=EventType.FAILED, service=self.name, data={"code": error.code.value, "message": error.message}
        )
        with contextlib.suppress(Exception):
            body = FollowEncoder(cause, principal=principal).encode(Kind.EVENT, event)
            await self.nc.publish(subjects.events(tenant, principal, run_id), body)

    async def _abandon(self, request: Request[Any], subject: str, reply: str, tenant_facing: bool) -> None:
        """A message this replica stops working on: the requester is told so, typed and
        retryable, and a watched run gets its ``failed`` event, instead of waiting out the deadline."""
        error = Unavailable(f"the {self.name} replica handling this stopped before it finished; it may be retried")
        with contextlib.suppress(Exception):
            await request.emit(
                RunEvent(
                    type=EventType.FAILED, service=self.name, data={"code": error.code.value, "message": error.message}
                )
            )
        await self._refuse(subject, reply, request.tenant, request.envelope, error, request.principal, tenant_facing)

    def _raw(self, handler: RawHandler, stats: OperationStats) -> Callable[[Msg], Awaitable[None]]:
        """A raw operation's subject carries no tenant: its handler may return the ``(tenant, error
        code)`` it found (the auth callout: the verified token's tenant), and the message is
        counted for it once handled (so a raw operation's in-flight figure stays 0)."""

        async def handle(msg: Msg) -> None:
            started = time.perf_counter()
            tenant: str | None = None
            failure: str | None = None
            try:
                outcome = await handler(msg)
                if outcome is not None:
                    tenant, failure = outcome
            except Exception:  # a handler's bug must not end its subscription
                failure = ErrorCode.INTERNAL.value
                self.log.exception("handler_failed", subject=msg.subject[:200])
            stats.finish(stats.start(tenant or UNKNOWN), time.perf_counter() - started, failure)

        return handle

    async def _consume(
        self, op: Durable, envelope_type: type[Envelope[Any]], handler: Handler, stats: OperationStats
    ) -> None:
        """Pull a durable consumer's messages while the service runs; each is acknowledged once
        handled (answered, or refused with a typed error). A replica killed mid-message never
        acknowledges it, so the broker hands it to another replica after ``ack_wait_s``."""
        js = self.nc.jetstream()
        durable = self.manifest.durable_name(op)
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=op.subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=op.ack_wait_s,
            max_deliver=op.max_deliver,
            max_ack_pending=self.settings.max_in_flight,
        )
        await self._durable_consumer(js, op, durable, config)

        async def handle(msg: Msg) -> None:
            # In-progress acknowledgements keep a long message from being redelivered while it runs.
            heartbeat = asyncio.create_task(_keep_in_progress(msg, op.ack_wait_s / 2))
            try:
                request = await self._dispatch(op, envelope_type, handler, stats, msg, "")
            finally:
                heartbeat.cancel()
            with contextlib.suppress(Exception):  # unacknowledged, it is redelivered: nothing lost
                if request is not None and request.redeliver is not None:
                    await msg.nak(delay=request.redeliver)
                else:
                    await msg.ack()

        # Each message is started as it arrives, its slot taken before it was asked for.
        pull = PullConsumer(
            self.nc,
            op.stream,
            durable,
            slots=self._slots,
            start=lambda msg: self._start(handle, msg, None),
            give_back=lambda: self._release(None),
            most=DURABLE_BATCH,
            log=self.log,
        )
        self._pulls.append(pull)
        try:
            await pull.run()
        finally:
            self._pulls.remove(pull)

    async def _durable_consumer(self, js: Any, op: Durable, durable: str, config: ConsumerConfig) -> None:
        """Find the operation's durable consumer, or create it; until JetStream answers (a broker
        or a cluster still starting, its stream's leader being elected), try again: a replica
        whose consumer was never made would never take a message of it."""
        wait = 0.1
        while True:
            try:
                try:
                    await js.consumer_info(op.stream, durable)
                except NotFoundError:
                    with contextlib.suppress(BadRequestError):  # another replica created it meanwhile
                        await js.add_consumer(op.stream, config=config)
                return
            except (*BROKER_TRANSIENT, APIError) as error:
                self.log.warning("durable_consumer_not_ready", operation=op.name, error=repr(error), retry_s=wait)
                await asyncio.sleep(wait)  # a backoff, not a synchronisation
                wait = min(2.0, wait * 2)

    async def _refuse(
        self,
        subject: str,
        reply: str,
        tenant: str | None,
        envelope: Envelope[Any] | None,
        error: CorralError,
        principal: str | None = None,
        tenant_facing: bool = False,
    ) -> None:
        """Count a refusal (logged and audited per window, services/runtime/refusals.py) and answer
        it with a typed error where a reply is possible and safe. ``principal``: the verified one,
        where the subject named it (never what an envelope claims)."""
        self.refusals.add(
            tenant,
            error.code.value,
            error.message,
            subject,
            principal=principal,
            run_id=envelope.run_id if envelope else None,
            audit=not error.remote and not error.audited,
        )
        if not reply or tenant is None:
            return
        # A tenant-facing reply goes only to the tenant's inbox (never a service's, which no tenant
        # may name), and for a principal-scoped tenant only to the principal's own.
        scope = principal if tenant_facing and self.principal_scoped(tenant) else None
        try:
            check_reply(reply, tenant, allow_service_inbox=not tenant_facing, principal=scope)
        except CorralError:
            return  # never answer into another tenant's inbox (nor, scoped, another user's)
        info = ErrorInfo.of(error)
        if envelope is not None:
            body = FollowEncoder(envelope, principal=principal).encode(Kind.ERROR, info)
        else:
            body = new_envelope_json(Kind.ERROR, tenant, info)
        with contextlib.suppress(Exception):
            await self.nc.publish(reply, body)

    async def answer_ping(self, msg: Msg) -> None:
        """Answer a readiness probe on ``corral.ping.<service>`` (on the connection it came by: a
        service outside APP subscribes it on its connection there, as the auth service does)."""
        if msg.reply:
            body = {
                "service": self.name,
                "name": self.replica_name,
                "replica": self.stats.replica_id,
                "pid": os.getpid(),
                "in_flight": len(self._in_flight),
            }
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps(body).encode())

    async def answer_stats(self, msg: Msg) -> None:
        """Answer a statistics request (a page of tenants, or the ones asked for) with a typed
        error for a malformed one. Subscribed on ``corral.stats.<service>``; a service outside
        APP subscribes it on its connection there (the auth service's audit writer)."""
        if not msg.reply:
            return
        # This thread's CPU building the reply (no await in between, so nothing else's): what
        # being monitored costs the replica, reported as the snapshot's stats_cpu_s.
        started = time.thread_time()
        try:
            body = json.dumps(self.stats.snapshot(**parse_stats_request(msg.data))).encode()
        except CorralError as error:
            body = json.dumps({"error": {"code": error.code.value, "message": error.message}}).encode()
        self.stats.stats_cpu_s += time.thread_time() - started
        with contextlib.suppress(Exception):
            await msg.respond(body)

    async def _on_error(self, error: Exception) -> None:
        self.log.warning("nats_error", error=str(error))


def _principal_in(subject: str) -> str | None:
    """The principal a tenant-facing subject names (``t.<tenant>.<area>.<op>.<principal>[...]``)."""
    parts = subject.split(".")
    try:
        return subjects.principal_of(parts[4]) if len(parts) > 4 else None
    except CorralError:
        return None


async def _keep_in_progress(msg: Msg, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        with contextlib.suppress(Exception):
            await msg.in_progress()


def decode_request(data: bytes, envelope_type: type[Envelope[Any]]) -> Envelope[Any]:
    """Validate a request body; errors name the fields, never echo the body."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise InvalidRequest(f"message of {len(data)} bytes is over the {MAX_MESSAGE_BYTES} byte limit")
    try:
        return envelope_type.model_validate_json(data)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid envelope: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def catalog_service(manifest: Manifest, register: Callable[[Service, Any], Any]) -> Callable[[Settings], Service]:
    """The ``build`` of a service whose handlers need the definitions (router, graph, tools)."""
    from services.runtime.catalog import load_catalog

    def build(settings: Settings) -> Service:
        service = Service(manifest, settings)
        register(service, load_catalog(settings.definitions_paths()))
        return service

    return build


def run_service(build: Callable[[Settings], Service], manifest: Manifest) -> None:
    """Entry point of a service's ``__main__``: build it from its settings and run it."""
    try:
        with event_loop.collector_paused():
            service = build(manifest.settings())
        gc.set_threshold(*event_loop.GC_THRESHOLDS)  # starting (the registry's tenants too), until settled
    except DefinitionError as error:  # every problem on its line, no traceback (`corral validate` prints the same)
        raise SystemExit(f"{manifest.name}: the definitions have problems:\n{error.message}") from None
    with contextlib.suppress(KeyboardInterrupt):
        event_loop.run(service.run())
    structlog.get_logger().debug("exit")
