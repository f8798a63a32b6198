"""The envelope every message body travels in, and the typed payloads per kind.

``Envelope[P]`` is generic over its payload: a handler states the payload type it expects and the
body is validated on arrival. Unknown fields are refused (``extra="forbid"``) so a typo or an
injected field is an error, not silently ignored.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue, PlainValidator, WithJsonSchema

from contracts.errors import CorralError, ErrorCode, InvalidRequest
from contracts.tenants import WireName as Name
from contracts.tenants import WireRunId as RunId
from contracts.tenants import WireTenantId as TenantId
from contracts.traceparent import PATTERN as TRACEPARENT_PATTERN

# A conversation's id: chosen by the client or the service, kept under the tenant's own keys.
SessionId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
# A W3C traceparent (contracts/traceparent.py); anything else a sender writes becomes None, never
# an error: a tenant's malformed trace context costs it its trace, not its request.


def _dropped_trace(value: object) -> None:
    return None


# The pattern is checked by pydantic-core (no Python on the hot path); only a malformed value
# reaches the fallback, which drops it. All-zero ids pass the pattern: the router replaces them.
Trace = Annotated[
    Annotated[str, Field(pattern=TRACEPARENT_PATTERN)]  # noqa: RUF036 (left to right: None before the fallback)
    | None
    | Annotated[object, PlainValidator(_dropped_trace), WithJsonSchema({"type": "null"})],
    Field(union_mode="left_to_right"),
]

SCHEMA_VERSION = 1
# The largest body a service accepts; the server's max_payload is set to the same value.
MAX_MESSAGE_BYTES = 1024 * 1024


# A random per-process prefix and a counter: unique ids at a fraction of uuid4's cost (no syscall
# per id). Ids name messages and runs; they are not secrets.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def new_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Stamps:
    """UTC timestamps as ISO 8601 text with microseconds. The date and time of a whole second are
    formatted once and reused for every stamp in that second: envelopes are stamped several times
    per hop, and ``datetime`` formatting was a visible part of a hop's cost."""

    __slots__ = ("_cached",)

    def __init__(self) -> None:
        self._cached: tuple[int, str] = (-1, "")  # a second and its text, swapped as one

    def at(self, timestamp: float) -> str:
        second = int(timestamp // 1)
        micro = round((timestamp - second) * 1_000_000)
        if micro == 1_000_000:
            second, micro = second + 1, 0
        cached, text = self._cached
        if second != cached:
            text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._cached = (second, text)
        return f"{text}.{micro:06d}+00:00"


_CREATED = _Stamps()
_DEADLINES = _Stamps()  # a separate slot: deadlines lie in another second than the clock


def now_iso() -> str:
    """The current UTC time as ISO 8601 with microseconds, for ``created_at``."""
    return _CREATED.at(time.time())


class Kind(StrEnum):
    REQUEST = "request"
    GRAPH_RUN = "graph_run"
    TOOL_CALL = "tool_call"
    WORKFLOW_START = "workflow_start"
    WORKFLOW_TASK = "workflow_task"
    WORKFLOW_SIGNAL = "workflow_signal"
    WORKFLOW_QUERY = "workflow_query"
    MONITOR_QUERY = "monitor_query"
    SWARM_TURN = "swarm_turn"
    RESULT = "result"
    EVENT = "event"
    ERROR = "error"


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouterRequest(_Payload):
    """What a client asks for: a target (route name) or the tenant's default, and an input."""

    target: Name | None = None
    input: dict[str, JsonValue] = Field(default_factory=dict)
    # The conversation a turn belongs to (routes of pattern swarm and orchestrator; None: a new one).
    session: SessionId | None = None
    # Publish progress events on t.<tenant>.events.<run_id> (the client subscribes first).
    stream: bool = True


class GraphRun(_Payload):
    graph: Name
    input: dict[str, JsonValue] = Field(default_factory=dict)
    stream: bool = True


class WorkflowStart(_Payload):
    """A run of a workflow the tenant's routes name (the router sends it)."""

    workflow: Name
    input: dict[str, JsonValue] = Field(default_factory=dict)
    stream: bool = True


class SwarmTurn(_Payload):
    """One turn of a conversation: a user's message to a swarm (or to one agent, the
    orchestrator's, or an agent called as a tool), in a session (None: a new one)."""

    swarm: Name | None = None
    agent: Name | None = None
    message: str = Field(max_length=1_000_000)
    session: SessionId | None = None
    # False: an agent called as a tool by another (nothing is kept of its conversation).
    keep: bool = True
    depth: int = Field(default=0, ge=0, le=8)  # agents calling agents as tools, nested
    stream: bool = True


class WorkflowTask(_Payload):
    """A wake-up of one run (the engine's own, on its work queue)."""

    run_id: RunId


class WorkflowSignal(_Payload):
    """A signal to a run of the sender's tenant: ``signal`` names what a wait step waits for
    (``cancel`` cancels the run); ``data`` is the wait step's output."""

    run_id: RunId
    signal: Name
    data: dict[str, JsonValue] = Field(default_factory=dict)


class WorkflowQuery(_Payload):
    """``list`` the tenant's runs (optionally in one ``status``) or ``show`` one run's history."""

    op: Literal["list", "show"]
    run_id: RunId | None = None
    status: str | None = Field(default=None, max_length=32)
    limit: int = Field(default=50, ge=1, le=1000)
    # ``show``: the events after this many (pages through a long history).
    after: int = Field(default=0, ge=0)


class MonitorQuery(_Payload):
    """The sender's own tenant's figures over the last minute (as ``/api/tenants/<tenant>``);
    ``subjects``: with its per-subject rows too (as ``/api/subjects``). No field names a tenant:
    the monitor answers for the tenant of the subject only."""

    subjects: bool = False


class ToolCall(_Payload):
    tool: Name
    arguments: dict[str, JsonValue] = Field(default_factory=dict)


class Result(_Payload):
    output: JsonValue = None


class EventType(StrEnum):
    ACCEPTED = "accepted"
    STARTED = "started"
    NODE_STARTED = "node_started"
    NODE_COMPLETED = "node_completed"
    NODE_FAILED = "node_failed"
    COMPLETED = "completed"
    FAILED = "failed"
    # A workflow run's steps (services/workflow).
    STEP_STARTED = "step_started"
    STEP_COMPLETED = "step_completed"
    STEP_FAILED = "step_failed"
    STEP_RETRYING = "step_retrying"
    WAITING = "waiting"
    SIGNAL_RECEIVED = "signal_received"
    SIGNAL_BUFFERED = "signal_buffered"  # sent before the run reached its wait: kept for it
    SLEEPING = "sleeping"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    CANCELLED = "cancelled"
    # A conversation's turn (services/swarm).
    AGENT_STARTED = "agent_started"
    TOOL_CALLED = "tool_called"
    HANDOFF = "handoff"
    MESSAGE = "message"
    LIMIT_REACHED = "limit_reached"


class RunEvent(_Payload):
    type: EventType
    service: str
    node: str | None = None
    elapsed_ms: float | None = None
    data: dict[str, JsonValue] = Field(default_factory=dict)


class ErrorInfo(_Payload):
    code: ErrorCode
    message: str
    retryable: bool = False

    @classmethod
    def of(cls, error: CorralError) -> ErrorInfo:
        return cls(code=error.code, message=error.message, retryable=error.retryable)


P = TypeVar("P")


class Envelope(BaseModel, Generic[P]):
    """One message on the bus. ``tenant_id`` must equal the tenant token of its subject."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default_factory=new_id, max_length=64)
    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Kind
    tenant_id: TenantId
    principal: str | None = Field(default=None, max_length=256)
    run_id: RunId | None = None
    correlation_id: str | None = Field(default=None, max_length=64)
    causation_id: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    deadline: datetime | None = None
    trace: Trace = None
    idempotency_key: str | None = Field(default=None, max_length=128)
    payload: P

    def remaining(self, default: float) -> float:
        """Seconds left before the deadline (``default`` if there is none)."""
        if self.deadline is None:
            return default
        return self.deadline.timestamp() - time.time()  # half the cost of datetime arithmetic

    def follow(self, kind: Kind, payload: BaseModel) -> Envelope[Any]:
        """A new envelope caused by this one: same tenant, principal, run, deadline and trace.

        Every field comes from this (validated) envelope or is generated here, and ``payload`` was
        validated when it was built, so the envelope is constructed without validating again:
        this runs several times per message on every hop.
        """
        return envelope_of(type(payload)).model_construct(
            id=new_id(),
            schema_version=SCHEMA_VERSION,
            kind=kind,
            tenant_id=self.tenant_id,
            principal=self.principal,
            run_id=self.run_id,
            correlation_id=self.correlation_id or self.id,
            causation_id=self.id,
            created_at=utcnow(),
            deadline=self.deadline,
            trace=self.trace,
            idempotency_key=None,
            payload=payload,
        )


class FollowEncoder:
    """Encodes the envelopes that follow one envelope, straight to JSON bytes.

    The same bytes as ``envelope.follow(kind, payload).model_dump_json()``, but the fields shared
    by every follower (tenant, principal, run, correlation, causation, deadline, trace) are
    serialised once per incoming message instead of once per outgoing one; a graph run sends
    several events per node, so this is most of the envelope work on the hot path.
    """

    __slots__ = ("_shared",)

    def __init__(
        self,
        cause: Envelope[Any],
        until: float | None = None,
        principal: str | None = None,
        idempotency_key: str | None = None,
        trace: str | None = None,
    ) -> None:
        """``until``: the cause's deadline as a timestamp, if the caller has it (cheaper to write).
        ``principal``: the verified principal, written instead of the one the cause claims.
        ``idempotency_key``: carried on (a request passed on keeps its client's key); else none.
        ``trace``: the traceparent to write instead of the cause's (this hop's span as the parent)."""
        text = _json_string
        if until is not None:
            deadline = f'"{_DEADLINES.at(until)}"'
        else:
            deadline = text(cause.deadline.isoformat()) if cause.deadline else "null"
        principal = cause.principal if principal is None else principal
        trace = cause.trace if trace is None else trace
        self._shared = (
            f'"tenant_id":"{cause.tenant_id}","principal":{text(principal)},'  # tenant ids need no escaping
            f'"run_id":{text(cause.run_id)},"correlation_id":{text(cause.correlation_id or cause.id)},'
            f'"causation_id":{text(cause.id)},"deadline":{deadline},'
            f'"trace":{text(trace)},"idempotency_key":{text(idempotency_key)}'
        )

    def encode(self, kind: Kind, payload: BaseModel) -> bytes:
        return self.encode_json(kind, payload.model_dump_json().encode())

    def encode_json(self, kind: Kind, payload: bytes) -> bytes:
        """The same, with the payload already serialised (it must be the JSON of a valid payload)."""
        head = (
            f'{{"id":"{new_id()}","schema_version":{SCHEMA_VERSION},"kind":"{kind.value}",'
            f'"created_at":"{now_iso()}",{self._shared},"payload":'
        )
        return b"".join((head.encode(), payload, b"}"))


def new_envelope_json(
    kind: Kind,
    tenant_id: str,
    payload: BaseModel | bytes,
    *,
    run_id: str | None = None,
    deadline: datetime | float | None = None,
    idempotency_key: str | None = None,
    principal: str | None = None,
    trace: str | None = None,
    correlation_id: str | None = None,
) -> bytes:
    """A new envelope (caused by nothing) as JSON bytes, the same fields as building the model and
    dumping it would write, without the model: what a client does for every request.

    ``tenant_id`` must already be a valid tenant id and ``payload`` a validated payload; the
    receiving service validates the whole envelope as it does any other. ``deadline`` may be a
    datetime or a POSIX timestamp. ``payload`` may already be JSON (of a valid payload).
    ``trace``: a W3C traceparent (``contracts.traceparent.new_traceparent``), else none.
    ``correlation_id``: the request a message belongs to, where it is not its cause (a workflow
    run's events and calls carry its start request's, long after that request was answered).
    """
    text = _json_string
    body = payload if isinstance(payload, bytes) else payload.model_dump_json().encode()
    if isinstance(deadline, float | int):
        deadline_text = f'"{_DEADLINES.at(deadline)}"'
    else:
        deadline_text = text(deadline.isoformat()) if deadline else "null"
    return (
        (
            f'{{"id":"{new_id()}","schema_version":{SCHEMA_VERSION},"kind":"{kind.value}",'
            f'"tenant_id":"{tenant_id}","principal":{text(principal)},"run_id":{text(run_id)},'
            f'"correlation_id":{text(correlation_id)},"causation_id":null,"created_at":"{now_iso()}",'
            f'"deadline":{deadline_text},"trace":{text(trace)},"idempotency_key":{text(idempotency_key)},"payload":'
        ).encode()
        + body
        + b"}"
    )


_PLAIN = re.compile(r"[A-Za-z0-9_.:+\-]*")


def _json_string(value: str | None) -> str:
    if value is None:
        return "null"
    # Ids, run ids and timestamps need no escaping: skip the encoder for them (the common case).
    return f'"{value}"' if _PLAIN.fullmatch(value) else json.dumps(value, ensure_ascii=False)


_ENVELOPE_TYPES: dict[Any, type[Envelope[Any]]] = {}


def envelope_of(payload_type: Any) -> type[Envelope[Any]]:
    """``Envelope[payload_type]``, kept alive here: pydantic caches parametrised generics only
    weakly, and rebuilding one (schema generation) cost more than the rest of a hop."""
    found = _ENVELOPE_TYPES.get(payload_type)
    if found is None:
        found = _ENVELOPE_TYPES[payload_type] = Envelope[payload_type]  # type: ignore[valid-type]
    return found


def deadline_in(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


# The payload each kind of envelope carries (what a reader validates it with).
PAYLOADS: dict[Kind, type[BaseModel]] = {
    Kind.REQUEST: RouterRequest,
    Kind.GRAPH_RUN: GraphRun,
    Kind.TOOL_CALL: ToolCall,
    Kind.WORKFLOW_START: WorkflowStart,
    Kind.WORKFLOW_TASK: WorkflowTask,
    Kind.WORKFLOW_SIGNAL: WorkflowSignal,
    Kind.WORKFLOW_QUERY: WorkflowQuery,
    Kind.MONITOR_QUERY: MonitorQuery,
    Kind.SWARM_TURN: SwarmTurn,
    Kind.RESULT: Result,
    Kind.EVENT: RunEvent,
    Kind.ERROR: ErrorInfo,
}


def decode_envelope(data: bytes | str) -> Envelope[Any]:
    """Any envelope, validated strictly, its payload as the payload of its ``kind`` (for tools and
    tests; a service validates the one kind each operation takes)."""
    try:
        kind = Kind(json.loads(data)["kind"])
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest("not an envelope: no known kind") from None
    try:
        return envelope_of(PAYLOADS[kind]).model_validate_json(data)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise InvalidRequest(f"invalid {kind.value} envelope: {error}") from None


# Replies are results or errors; decoded loosely first, then by kind.
AnyEnvelope = Envelope[JsonValue]
