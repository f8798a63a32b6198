"""W3C trace context (``traceparent``) for the envelope's ``trace`` field: made, checked, followed.

``00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>``, lowercase, neither id all zeros
(https://www.w3.org/TR/trace-context/#traceparent-header). Only version ``00`` is accepted: a
tenant writes this field, so anything else (other versions, uppercase, extra text, other types)
is dropped, not echoed anywhere, and the request goes on as if it had none. Pure and cheap: the
client makes one per request, without OpenTelemetry.
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

PATTERN = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
_VALID = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
LENGTH = 55

# Span ids of this process: a random prefix and a counter (never all zeros: the prefix is odd).
_SPAN_PREFIX = f"{int.from_bytes(os.urandom(4)) | 1:08x}"
_SPAN_COUNTER = itertools.count(1)


def new_traceparent() -> str:
    """A new trace (random 128-bit trace id, a new span id), sampled."""
    trace_id = os.urandom(16).hex()
    if trace_id == _ZERO_TRACE:  # 2**-128; the spec forbids it all the same
        trace_id = "0" * 31 + "1"
    return f"00-{trace_id}-{new_span_id()}-01"


def new_span_id() -> str:
    """A span id unique in this process and, by its random prefix, across processes."""
    return f"{_SPAN_PREFIX}{next(_SPAN_COUNTER) & 0xFFFFFFFF:08x}"


def parse(value: object) -> tuple[str, str, str] | None:
    """``(trace id, parent span id, flags)`` of a valid traceparent, else None."""
    if not isinstance(value, str) or len(value) != LENGTH:
        return None
    found = _VALID.fullmatch(value)
    if found is None:
        return None
    trace_id, span_id = found.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, value[53:]


def valid_or_none(value: Any) -> str | None:
    """The envelope's check: a valid traceparent is kept, anything else becomes None (never an error)."""
    return value if parse(value) is not None else None


def unusable(value: str | None) -> bool:
    """Whether an envelope's (pattern-checked) trace cannot be carried on: none, or an all-zero id."""
    return value is None or value[3:35] == _ZERO_TRACE or value[36:52] == _ZERO_SPAN


def child(traceparent: str, span_id: str) -> str:
    """The traceparent of a hop caused by ``traceparent``'s, whose span is ``span_id``."""
    return f"{traceparent[:36]}{span_id}{traceparent[52:]}"


def trace_id_of(traceparent: str | None) -> str | None:
    return traceparent[3:35] if traceparent else None
