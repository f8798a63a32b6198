"""What the runtime tells a tool about the call: never taken from the arguments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ToolContext:
    """The authoritative tenant (from the subject), the run, the principal and the time left.

    ``idempotency_key`` is the caller's name for this call (the envelope's): a retry of the same
    call, after a crash say, carries the same key, so a tool can recognise the repeat and not act
    twice. None when the caller gave none.
    """

    tenant_id: str
    run_id: str | None
    principal: str | None
    timeout_s: float
    idempotency_key: str | None = None
