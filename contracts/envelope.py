"""The envelope every message body travels in, and the typed payloads per kind.

``Envelope[P]`` is generic over its payload: a handler states the payload type it expects and the
body is validated on arrival. Unknown fields are refused (``extra="forbid"``) so a typo or an
injected field is an error, not silently ignored.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from contracts.errors import CorralError, ErrorCode
from contracts.tenants import Name, RunId, TenantId

SCHEMA_VERSION = 1
# The largest body a service accepts; the server's max_payload is set to the same value.
MAX_MESSAGE_BYTES = 1024 * 1024


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Kind(StrEnum):
    REQUEST = "request"
    GRAPH_RUN = "graph_run"
    TOOL_CALL = "tool_call"
    RESULT = "result"
    EVENT = "event"
    ERROR = "error"


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouterRequest(_Payload):
    """What a client asks for: a target (route name) or the tenant's default, and an input."""

    target: Name | None = None
    input: dict[str, JsonValue] = Field(default_factory=dict)


class GraphRun(_Payload):
    graph: Name
    input: dict[str, JsonValue] = Field(default_factory=dict)


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
    trace: str | None = Field(default=None, max_length=128)
    idempotency_key: str | None = Field(default=None, max_length=128)
    payload: P

    def remaining(self, default: float) -> float:
        """Seconds left before the deadline (``default`` if there is none)."""
        if self.deadline is None:
            return default
        return (self.deadline - utcnow()).total_seconds()

    def follow(self, kind: Kind, payload: Any, **changes: Any) -> Envelope[Any]:
        """A new envelope caused by this one: same tenant, principal, run, deadline and trace."""
        fields: dict[str, Any] = {
            "kind": kind,
            "tenant_id": self.tenant_id,
            "principal": self.principal,
            "run_id": self.run_id,
            "correlation_id": self.correlation_id or self.id,
            "causation_id": self.id,
            "deadline": self.deadline,
            "trace": self.trace,
            "payload": payload,
        }
        fields.update(changes)
        return Envelope[type(payload)](**fields)  # type: ignore[misc]


def deadline_in(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


# Replies are results or errors; decoded loosely first, then by kind.
AnyEnvelope = Envelope[JsonValue]
