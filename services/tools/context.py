"""What the runtime tells a tool about the call: never taken from the arguments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ToolContext:
    """The authoritative tenant (from the subject), the run, the principal and the time left."""

    tenant_id: str
    run_id: str | None
    principal: str | None
    timeout_s: float
