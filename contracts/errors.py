"""Stable error codes and the typed exceptions that carry them across service boundaries.

A user sees ``code`` and ``message``; the detail stays in the logs. Nothing here ever carries a
traceback onto the wire.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class ErrorCode(StrEnum):
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    TENANT_MISMATCH = "tenant_mismatch"
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    TOOL_FAILED = "tool_failed"
    LIMIT_EXCEEDED = "limit_exceeded"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class CorralError(Exception):
    """Base of every error Corral reports; ``code`` is what travels on the wire."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        # True when the error was decoded from another service's reply rather than raised here.
        self.remote = False
        # True once a handler has written its own audit record for it (no second, generic one).
        self.audited = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value}: {self.message})"


class Unauthorized(CorralError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(CorralError):
    code = ErrorCode.FORBIDDEN


class TenantMismatch(CorralError):
    code = ErrorCode.TENANT_MISMATCH


class InvalidRequest(CorralError):
    code = ErrorCode.INVALID_REQUEST


class NotFound(CorralError):
    code = ErrorCode.NOT_FOUND


class RateLimited(CorralError):
    code = ErrorCode.RATE_LIMITED
    retryable = True


class DeadlineExceeded(CorralError):
    code = ErrorCode.DEADLINE_EXCEEDED
    retryable = True


class ToolFailed(CorralError):
    code = ErrorCode.TOOL_FAILED


class LimitExceeded(CorralError):
    """A run reached a bound its definition sets (steps, visits, turns, nesting): trying again
    the same way reaches it again."""

    code = ErrorCode.LIMIT_EXCEEDED


class Conflict(CorralError):
    """The request contradicts the state it acts on: an idempotency key reused with another input,
    a signal to a run that is finished or not waiting for it."""

    code = ErrorCode.CONFLICT


class Unavailable(CorralError):
    """Nothing serves the request right now (no replica is running, or the one holding it is
    stopping, or the client is not connected): trying again later, or elsewhere, may succeed."""

    code = ErrorCode.UNAVAILABLE
    retryable = True


class Internal(CorralError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[CorralError]] = {
    cls.code: cls
    for cls in (
        Unauthorized,
        Forbidden,
        TenantMismatch,
        InvalidRequest,
        NotFound,
        RateLimited,
        DeadlineExceeded,
        ToolFailed,
        LimitExceeded,
        Conflict,
        Unavailable,
        Internal,
    )
}


def error_for(code: ErrorCode | str, message: str) -> CorralError:
    """Rebuild the typed exception for an error that arrived over the bus."""
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except ValueError:
        cls = Internal
    return cls(message)
