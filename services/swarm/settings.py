"""Settings of the swarm service (``CORRAL_*``, on top of every service's)."""

from __future__ import annotations

from pydantic import Field

from services.runtime.settings import Settings


class SwarmSettings(Settings):
    # A conversation nobody has spoken in for this long is forgotten (the session bucket's age
    # limit: every turn rewrites its session).
    swarm_session_idle_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    # A turn holds its session this long, renewed a third of the way: after a kill -9 mid-turn,
    # the session takes a next turn this long after the last renewal at most.
    swarm_claim_s: float = Field(default=5.0, gt=0.3, le=300)

    @classmethod
    def of(cls, settings: Settings) -> SwarmSettings:
        return settings if isinstance(settings, cls) else cls(**settings.model_dump())
