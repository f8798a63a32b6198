"""Settings of the workflow service (``CORRAL_*``, on top of every service's)."""

from __future__ import annotations

from pydantic import Field

from services.runtime.settings import Settings


class WorkflowSettings(Settings):
    # How long a replica holds a run without renewing (it renews a third of the way): after a
    # kill -9, another replica continues the run this long after the last renewal at most.
    workflow_lease_s: float = Field(default=2.0, gt=0.2, le=60)
    # A run blocked for less than this (a short retry backoff) waits in the replica; a longer
    # block (a sleep, an approval) is left to a broker timer and the replica lets the run go.
    workflow_inline_wait_s: float = Field(default=1.0, ge=0, le=30)
    # The history stream's size limit in bytes (-1: none). Full, new runs and steps are refused
    # with `unavailable` instead of older histories being dropped.
    workflow_history_max_bytes: int = Field(default=-1, ge=-1)

    @classmethod
    def of(cls, settings: Settings) -> WorkflowSettings:
        return settings if isinstance(settings, cls) else cls(**settings.model_dump())
