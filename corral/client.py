"""The Python client side of Corral: connect as a tenant, send requests, watch their events.

A tenant connection uses its application JWT as the connect token (the broker's auth callout
turns it into tenant-scoped permissions) and the tenant's inbox prefix, without which replies
could not reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats import errors as nats_errors
from nats.aio.client import DEFAULT_MAX_RECONNECT_ATTEMPTS, DEFAULT_RECONNECT_TIME_WAIT, Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, ConnectionReconnectingError, NoRespondersError, StaleConnectionError
from nats.errors import TimeoutError as NatsTimeout

from contracts import subjects
from contracts.envelope import (
    EventType,
    Kind,
    MonitorQuery,
    RouterRequest,
    RunEvent,
    WorkflowQuery,
    WorkflowSignal,
    envelope_of,
    new_envelope_json,
    new_id,
)
from contracts.errors import CorralError, DeadlineExceeded, TenantMismatch, Unauthorized, Unavailable, error_for
from contracts.replies import decode_reply
from contracts.tenants import validate_tenant_id
from contracts.tokens import scopes_in, subject_of, unverified_claims
from contracts.traceparent import new_traceparent, valid_or_none
from services.runtime import connection
from services.runtime.requests import ReplyLost, Requester

OnEvent = Callable[[RunEvent], Awaitable[None] | None]
TERMINAL = (EventType.COMPLETED, EventType.FAILED)
# A followed workflow run ends (for the client) when it finishes or waits for a signal.
WORKFLOW_STOPS = (EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED, EventType.WAITING)
NOT_CONNECTED = "not connected to Corral (was the token refused or has it expired?)"
TokenProvider = Callable[[], str | Awaitable[str]]
TOKEN_PROVIDER_TIMEOUT_S = 10.0
# The broker's ``authorization.timeout`` as ``corral init`` writes it (corral/state.py): how long
# it holds a connecting client for the auth callout's answer before refusing it.
BROKER_AUTH_TIMEOUT_S = 2.0
# How long ``connect`` keeps trying to be admitted while the broker times the callout out (a
# connection storm, an auth service restarting), and its waits between attempts (jittered).
ADMISSION_TIMEOUT_S = 30.0
ADMISSION_FIRST_WAIT_S = 0.5
ADMISSION_MOST_WAIT_S = 8.0
# Connection handshakes one process (one event loop) has under way at once; more wait their turn.
# The broker refuses a connection that has not sent CONNECT within its authorization.timeout of
# being accepted: a process opening thousands at once (a gateway, a benchmark) advanced them all a
# little at a time and every one of them missed it together; in turns, each finishes in time.
MAX_HANDSHAKES = 256
_handshakes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


@dataclass
class RunResult:
    run_id: str
    output: Any
    events: list[RunEvent] = field(default_factory=list)
    # The request's W3C traceparent: its trace id names the run's spans (docs/monitor.md, Traces).
    trace: str | None = None


class CorralClient:
    """One tenant's connection to Corral.

    The server cuts a tenant's connection when its token expires (the auth service gives the
    connection's user the token's expiry). With a ``token_provider`` (a callable returning a fresh
    token, sync or async) the client comes back by itself:

    - when the connection drops and nats-py reconnects, the ``disconnected_cb`` puts a fresh token
      into the connection's options first (nats-py reads ``options["token"]`` on every CONNECT);
    - when the server closes it for good (an expired user is answered ``-ERR 'User Authentication
      Expired'``, which nats-py treats as final), a new connection is opened with a fresh token.

    ``renewed`` is set, and any ``reconnected_cb`` given in the options called, each time the
    client came back. Without a provider an expired connection stays closed.

    Being admitted: a connect the broker could not authorise in time (``Authentication
    Timeout``, or a refusal that came only once the broker had waited ``callout_timeout_s`` for
    the auth callout: thousands of tenants connecting at once, an auth service restarting) is
    tried again after a jittered, doubling wait, until ``admission_timeout_s`` has passed
    (:meth:`connect`). A token the auth service refuses fails at once with
    :class:`~contracts.errors.Unauthorized`; a broker that does not listen at all fails at once too.
    A process has at most :data:`MAX_HANDSHAKES` connection handshakes under way; more wait their turn.
    """

    def __init__(
        self,
        url: str,
        tenant: str,
        token: str | Callable[[], str],
        options: dict[str, Any],
        token_provider: TokenProvider | None = None,
    ) -> None:
        self.url = url
        self.tenant = validate_tenant_id(tenant)
        if callable(token):  # the older form of a provider: a callable as the token itself
            token_provider = token_provider or token
            token = token()
        self.token: str = token
        self._address(token)
        self.token_provider = token_provider
        self.options = dict(options)
        # The caller's own callbacks are chained with the client's, not replaced by them.
        self._user_error_cb = self.options.pop("error_cb", None)
        self._user_disconnected_cb = self.options.pop("disconnected_cb", None)
        self._user_reconnected_cb = self.options.pop("reconnected_cb", None)
        self._user_closed_cb = self.options.pop("closed_cb", None)
        self.errors: list[Exception] = []
        self.renewed = asyncio.Event()
        self.nc: Client = Client()
        self._requester = Requester(self.nc)  # replaced with each connection
        self._closing = False
        self._fresh = False  # self.token came from the provider and no connection has used it yet
        self._admitting = False  # an attempt is being given up: its callbacks are not the client's
        self.admission_timeout_s = ADMISSION_TIMEOUT_S
        self.callout_timeout_s = BROKER_AUTH_TIMEOUT_S
        self.attempts = 0  # connection attempts the last admission took

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        tenant: str,
        token: str | Callable[[], str],
        token_provider: TokenProvider | None = None,
        admission_timeout_s: float = ADMISSION_TIMEOUT_S,
        callout_timeout_s: float = BROKER_AUTH_TIMEOUT_S,
        **options: Any,
    ) -> CorralClient:
        """Connect as ``tenant`` with ``token``; ``token_provider`` renews it (extra options go to nats-py).

        A connect the broker could not authorise in time is tried again with backoff for up to
        ``admission_timeout_s`` (then :class:`~contracts.errors.Unavailable`); ``callout_timeout_s``
        is the broker's ``authorization.timeout``: a refusal that comes that late is the broker
        giving up on the callout, not the auth service's answer. A refused token raises
        :class:`~contracts.errors.Unauthorized` at once."""
        client = cls(url, tenant, token, options, token_provider)
        client.admission_timeout_s = admission_timeout_s
        client.callout_timeout_s = callout_timeout_s
        client.nc = await client._admitted()
        return client

    async def _admitted(self) -> Client:
        """A connection, once the broker admits one: attempts the broker timed out are tried
        again after a jittered wait that doubles each time, until :attr:`admission_timeout_s`."""
        deadline = time.monotonic() + self.admission_timeout_s
        self.attempts = 0
        while True:
            self.attempts += 1
            started = time.monotonic()
            seen = len(self.errors)
            try:
                # The first attempt is always made; a later one ends with the deadline.
                async with asyncio.timeout(None if self.attempts == 1 else max(0.0, deadline - started)):
                    return await self._open()
            except CorralError:
                raise  # the client's own finding: a token of another tenant
            except Exception as raised:
                error = raised
                if isinstance(raised, nats_errors.NoServersError) and len(self.errors) > seen:
                    # nats-py gave up on the server: why is what its error callback was told last
                    # (a TCP connect timed out in a storm, the listen queue full; or refused).
                    error = self.errors[-1]
                if not _admission_timed_out(error, time.monotonic() - started, self.callout_timeout_s):
                    if _refused(error):
                        raise Unauthorized(
                            f"the broker refused the token (Authorization Violation) for tenant {self.tenant!r}: "
                            "the auth service found it invalid or expired, or the tenant has all the "
                            "connections its policy allows"
                        ) from None
                    raise
                wait = random.uniform(0, min(ADMISSION_MOST_WAIT_S, ADMISSION_FIRST_WAIT_S * 2 ** (self.attempts - 1)))
                if time.monotonic() + wait >= deadline:
                    raise Unavailable(
                        f"the broker did not admit this connection within {self.admission_timeout_s:g} s "
                        f"({self.attempts} attempt{'s' if self.attempts > 1 else ''}, the last: "
                        f"{str(error) or type(error).__name__}); "
                        "is the auth service running?"
                    ) from None
                await asyncio.sleep(wait)  # a backoff between attempts, not a synchronisation

    async def _open(self) -> Client:
        """One connection attempt. nats-py's own retries of a first connect are off (a refused
        token was sent again every 2 s for two minutes, and so was a connect to a broker not
        listening); the caller's reconnect options (or nats-py's) apply once connected."""
        options = {
            # Short, jittered waits, the first a little later than the services' (the auth
            # service must be back before a tenant can be let in), unless the caller chose.
            "reconnect_to_server_handler": connection.quick_reconnects(first_s=0.25),
            # Longer than the broker waits for the callout: the client hears the broker's verdict
            # instead of giving up on a connection that may be about to be admitted.
            "connect_timeout": self.callout_timeout_s + 1.0,
            **self.options,
        }
        async with _handshake_turn():
            return await self._handshake(options)

    async def _handshake(self, options: dict[str, Any]) -> Client:
        """Connect with ``options``, subscribe the inbox and check that the broker let this token
        read it; an attempt that fails anywhere is closed (else the broker might still admit it,
        counted against the tenant's connections) and its error raised."""
        reconnects = {
            "allow_reconnect": options.pop("allow_reconnect", True),
            "max_reconnect_attempts": options.pop("max_reconnect_attempts", DEFAULT_MAX_RECONNECT_ATTEMPTS),
            "reconnect_time_wait": options.pop("reconnect_time_wait", DEFAULT_RECONNECT_TIME_WAIT),
        }
        nc = connection.Connection()
        try:
            await nc.connect(
                self.url,
                token=self.token,
                # The principal's own inbox: the one a principal-scoped tenant's users may read.
                inbox_prefix=subjects.inbox_prefix(self.tenant, self.principal).encode(),
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed,
                name=f"corral-client-{self.tenant}",
                # One attempt: an unreachable broker is tried once more 50 ms later, nothing else.
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.05,
                **options,
            )
            nc.options.update(reconnects)  # read by nats-py whenever the connection drops
            requester = Requester(nc)
            nc.quiet = requester.quiet
            seen = len(self.errors)
            await requester.start()
            # A token of another tenant may not read this tenant's inbox. The broker says so only
            # asynchronously, to the error callback; after two round trips (a first PING may
            # overtake the SUB) it has, so such a token fails here rather than each request at its
            # deadline.
            await nc.flush()
            await nc.flush()
        except BaseException:
            self._admitting = True  # closing the attempt calls the callbacks: they are not this client's
            try:
                with contextlib.suppress(Exception):
                    await nc.close()
            finally:
                self._admitting = False
            raise
        if any(_refused_inbox(error) for error in self.errors[seen:]):
            self._closing = True
            with contextlib.suppress(Exception):
                await nc.close()
            raise TenantMismatch(
                f"this token may not act as tenant {self.tenant!r} (the broker refused it the tenant's inbox);"
                " is it another tenant's token?"
            )
        self._requester = requester
        return nc

    async def _fresh_token(self) -> bool:
        """Ask the provider for a new token; False (and the error recorded) if it gave none."""
        if self.token_provider is None:
            return False
        try:
            token = self.token_provider()
            if inspect.isawaitable(token):
                token = await asyncio.wait_for(token, timeout=TOKEN_PROVIDER_TIMEOUT_S)
            if not isinstance(token, str) or not token:
                raise TypeError(f"the token provider returned {type(token).__name__}, not a token")
        except Exception as error:  # a failing provider must not break nats-py's reconnection
            self.errors.append(error)
            return False
        self.token = token
        self._address(token)
        self._fresh = True
        return True

    def _address(self, token: str) -> None:
        """Requests go to the subject that names the token's principal (its ``sub``): the only
        one the broker lets this connection publish requests to."""
        self.principal = subject_of(token)
        # With the token's scopes, so that the tenant's route rules (``when``) see them.
        self.scopes = scopes_in(unverified_claims(token))
        self._router_subject = subjects.router_request(self.tenant, self.principal, self.scopes)

    async def _on_error(self, error: Exception) -> None:
        if self._admitting:
            return  # closing an attempt the broker has already closed: nothing the caller can act on
        self.errors.append(error)
        await _call(self._user_error_cb, error)

    async def _on_disconnected(self) -> None:
        if self._admitting:
            return
        self._requester.connection_lost()  # their replies are lost: a request fails now, retryable
        # nats-py awaits this before it reconnects, and before the closed callback when it closes.
        if not self._closing and await self._fresh_token():
            self.nc.options["token"] = self.token
        await _call(self._user_disconnected_cb)

    async def _on_reconnected(self) -> None:
        self._fresh = False
        if self.token_provider is not None:
            self.renewed.set()
        await _call(self._user_reconnected_cb)

    async def _on_closed(self) -> None:
        if self._admitting:
            return
        if self._closing or self.token_provider is None:
            await _call(self._user_closed_cb)
            return
        # The disconnected callback has normally fetched a fresh token just now; never reuse the
        # token the server has just refused.
        if not self._fresh and not await self._fresh_token():
            await _call(self._user_closed_cb)
            return
        self._fresh = False
        try:
            self.nc = await self._admitted()
        except Exception as error:  # the fresh token was refused too (or no server): stay closed
            self.errors.append(error)
            await _call(self._user_closed_cb)
            return
        self.renewed.set()
        await _call(self._user_reconnected_cb)

    async def close(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            await self.nc.drain()

    async def request(
        self,
        text: str | None = None,
        *,
        target: str | None = None,
        input: dict[str, Any] | None = None,
        timeout: float = 30.0,
        on_event: OnEvent | None = None,
        watch: bool = True,
        idempotency_key: str | None = None,
        follow: bool | None = None,
        session: str | None = None,
        trace: str | None = None,
    ) -> RunResult:
        """Send one request to the router and return its result; raises the typed error it ends in.

        A conversation's turn (a swarm or orchestrator route) is ``text`` in ``session`` (None:
        a new conversation); the output has the ``session`` to continue it with.

        A workflow route answers at once with the run it started (``{"run_id", "status": "running"}``);
        when followed the client then waits until the run finishes (the output is the run's, a
        failure raises its typed error), waits for a signal (the output says ``"status": "waiting"``
        and for what), or the timeout passes (``"status": "running"``). ``follow``: None (the
        default) follows it when ``watch``; True follows it without watching, so the run publishes
        only its outcome, not every step's events (the cheapest way to wait for a run's result);
        False answers with the start at once.

        With ``watch`` the run's events are collected (and passed to ``on_event``) until its
        terminal event, which may arrive just after the reply since it comes from another service.

        A graph run is at most once: a replica that stops (or dies) while running it gives it up.
        With an ``idempotency_key`` (the caller's promise that running it twice is safe) a request
        answered ``unavailable`` is sent once more, as a new run, within the same deadline; for
        work that must never be lost, use the workflow pattern.

        ``trace``: the W3C traceparent to send (the caller's own span, to join its trace); without
        one, or if it is not valid, the request starts a new trace (``RunResult.trace``).
        """
        deadline = time.monotonic() + timeout
        trace = valid_or_none(trace) or new_traceparent()
        try:
            return await self._attempt(
                text, target, input, timeout, on_event, watch, idempotency_key, follow, session, trace
            )
        except Unavailable:
            left = deadline - time.monotonic()
            if idempotency_key is None or left <= 0:
                raise
        return await self._attempt(text, target, input, left, on_event, watch, idempotency_key, follow, session, trace)

    async def _attempt(
        self,
        text: str | None,
        target: str | None,
        input: dict[str, Any] | None,
        timeout: float,
        on_event: OnEvent | None,
        watch: bool,
        idempotency_key: str | None,
        follow: bool | None = None,
        session: str | None = None,
        trace: str | None = None,
    ) -> RunResult:
        run_id = new_id()
        follows = watch if follow is None else follow
        started = time.monotonic()
        text_input = {"text": text} if text is not None else {}
        payload = RouterRequest(target=target, input={**(input or {}), **text_input}, session=session, stream=watch)
        body = new_envelope_json(
            Kind.REQUEST,
            self.tenant,
            payload,
            run_id=run_id,
            deadline=time.time() + timeout,
            idempotency_key=idempotency_key,
            trace=trace,
        )
        events: list[RunEvent] = []
        subscription = None
        finished = asyncio.Event()
        stopped = asyncio.Event()  # a workflow's run finished or began to wait
        if watch or follows:  # (without watch, a workflow run publishes only its outcomes)

            async def on_message(msg: Msg) -> None:
                event = envelope_of(RunEvent).model_validate_json(msg.data).payload
                events.append(event)
                if on_event is not None:
                    result = on_event(event)
                    if asyncio.iscoroutine(result):
                        await result
                if event.type in TERMINAL:
                    finished.set()
                if event.type in WORKFLOW_STOPS and event.service == "workflow":
                    stopped.set()

            try:
                subscription = await self.nc.subscribe(
                    subjects.events(self.tenant, self.principal, run_id), cb=on_message
                )
            except (ConnectionClosedError, ConnectionReconnectingError, StaleConnectionError):
                raise Unavailable(NOT_CONNECTED) from None
        try:
            try:
                msg = await self._requester.request(self._router_subject, body, timeout)
            except ReplyLost:
                raise Unavailable("the connection to the broker dropped while waiting for the answer") from None
            except NatsTimeout:
                raise DeadlineExceeded(f"no answer within {timeout:.1f}s") from None
            except NoRespondersError:
                # From the broker: nothing serves the router's subject, or the one it passed the
                # request on to (the executor answers the client directly).
                raise Unavailable(
                    "no service is serving this request (is the router, and the executor its route needs, running?)"
                ) from None
            except (ConnectionClosedError, ConnectionReconnectingError, StaleConnectionError):
                raise Unavailable(NOT_CONNECTED) from None
            output = decode_reply(msg.data)
            if subscription is not None and _is_workflow_start(output) and output["run_id"] == run_id:
                if not follows:
                    return RunResult(run_id=run_id, output=output, events=events, trace=trace)
                left = timeout - (time.monotonic() - started)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), timeout=max(0.0, left))
                return RunResult(run_id=run_id, output=_workflow_outcome(output, events), events=events, trace=trace)
            if watch and not _is_workflow_start(output):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), timeout=1.0)
            return RunResult(run_id=run_id, output=output, events=events, trace=trace)
        finally:
            if subscription is not None:
                await subscription.unsubscribe()

    # ---- workflow runs -------------------------------------------------------------

    async def signal(
        self,
        run_id: str,
        signal: str,
        data: dict[str, Any] | None = None,
        *,
        scope: str | None = None,
        timeout: float = 10.0,
    ) -> Any:
        """Send ``signal`` (an approval) to one of the tenant's runs; ``scope``: as the holder of
        that scope of the token (a wait step may require one; the broker checks the token holds it)."""
        payload = WorkflowSignal(run_id=run_id, signal=signal, data=data or {})
        subject = subjects.workflow_signal(self.tenant, self.principal, scope)
        return await self._call_service(subject, Kind.WORKFLOW_SIGNAL, payload, timeout)

    async def cancel(self, run_id: str, *, scope: str | None = None, timeout: float = 10.0) -> Any:
        """Cancel a run: its completed steps' compensations run, then it ends ``cancelled``."""
        return await self.signal(run_id, "cancel", scope=scope, timeout=timeout)

    async def runs(self, *, status: str | None = None, limit: int = 50, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The tenant's workflow runs, newest first."""
        payload = WorkflowQuery(op="list", status=status, limit=limit)
        answer = await self._call_service(
            subjects.workflow_query(self.tenant, self.principal), Kind.WORKFLOW_QUERY, payload, timeout
        )
        return list(answer["runs"])

    async def show(self, run_id: str, *, timeout: float = 10.0) -> dict[str, Any]:
        """One run: its summary and its whole history (every event, in order)."""
        subject = subjects.workflow_query(self.tenant, self.principal)
        events: list[dict[str, Any]] = []
        after = 0
        while True:
            payload = WorkflowQuery(op="show", run_id=run_id, after=after, limit=500)
            answer = await self._call_service(subject, Kind.WORKFLOW_QUERY, payload, timeout)
            events.extend(answer["events"])
            if answer.get("next") is None:
                return {"run": answer["run"], "events": events}
            after = answer["next"]

    # ---- the monitor ---------------------------------------------------------------

    async def monitor(self, *, with_subjects: bool = False, timeout: float = 5.0) -> dict[str, Any]:
        """This tenant's figures over the last minute, as the monitor's ``/api/tenants/<tenant>``
        (``with_subjects``: plus ``subjects``, as ``/api/subjects``); only ever this tenant's."""
        subject = subjects.monitor_query(self.tenant, self.principal, self.scopes)  # a scoped tenant's need them
        payload = MonitorQuery(subjects=with_subjects)
        return dict(await self._call_service(subject, Kind.MONITOR_QUERY, payload, timeout, service="monitor"))

    async def _call_service(
        self, subject: str, kind: Kind, payload: Any, timeout: float, *, service: str = "workflow"
    ) -> Any:
        body = new_envelope_json(kind, self.tenant, payload, deadline=time.time() + timeout, trace=new_traceparent())
        try:
            msg = await self._requester.request(subject, body, timeout)
        except ReplyLost:
            raise Unavailable("the connection to the broker dropped while waiting for the answer") from None
        except NatsTimeout:
            raise DeadlineExceeded(f"no answer within {timeout:.1f}s") from None
        except NoRespondersError:
            raise Unavailable(f"no {service} service is running") from None
        except (ConnectionClosedError, ConnectionReconnectingError, StaleConnectionError):
            raise Unavailable(NOT_CONNECTED) from None
        return decode_reply(msg.data)


def _handshake_turn() -> asyncio.Semaphore:
    """This event loop's turns of :data:`MAX_HANDSHAKES` connection handshakes."""
    loop = asyncio.get_running_loop()
    turns = _handshakes.get(loop)
    if turns is None:
        turns = _handshakes[loop] = asyncio.Semaphore(MAX_HANDSHAKES)
    return turns


def _refused(error: Exception) -> bool:
    """Whether a failed connect was the broker's refusal of the token (``Authorization Violation``)."""
    return "authorization violation" in str(error).lower()


def _admission_timed_out(error: Exception, elapsed_s: float, callout_timeout_s: float) -> bool:
    """Whether a failed connect means the broker could not authorise it in time, so that the same
    token may be admitted on another attempt: ``Authentication Timeout`` (the broker's own timer,
    from the connection's start), no answer within ``connect_timeout``, the broker closing the
    connection mid-handshake, or a refusal that came only after the broker had waited
    ``callout_timeout_s`` for the auth callout (it refuses with the same words as the auth service,
    which answers a token in milliseconds). A refused connection (no broker listening) is not."""
    if isinstance(error, ConnectionRefusedError):
        return False
    if isinstance(error, (TimeoutError, NatsTimeout, nats_errors.UnexpectedEOF, ConnectionError)):
        return True  # ConnectionError: reset, aborted or a broken pipe, the broker closed it
    text = str(error).lower()
    if "authentication timeout" in text:
        return True
    return _refused(error) and elapsed_s >= 0.9 * callout_timeout_s


def _refused_inbox(error: Exception) -> bool:
    """Whether an error the broker reported is its refusal of this connection's inbox subscription."""
    text = str(error).lower()
    return "permissions violation" in text and "subscription" in text and f'"{subjects.INBOX.lower()}.' in text


def _is_workflow_start(output: Any) -> bool:
    return isinstance(output, dict) and "run_id" in output and "workflow" in output and "status" in output


def _workflow_outcome(start: dict[str, Any], events: list[RunEvent]) -> Any:
    """What a followed workflow run came to: its output, its typed error, or where it stands."""
    for event in reversed(events):
        if event.service != "workflow":
            continue
        if event.type is EventType.COMPLETED:
            return event.data.get("output")
        if event.type is EventType.FAILED:
            raise error_for(str(event.data.get("code", "internal")), str(event.data.get("message", "the run failed")))
        if event.type is EventType.CANCELLED:
            return {**start, "status": "cancelled"}
        if event.type is EventType.WAITING:
            return {**start, "status": "waiting", "waiting_for": event.data.get("signal"), "step": event.node}
    return start


async def _call(callback: Callable[..., Any] | None, *args: Any) -> None:
    if callback is not None:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
