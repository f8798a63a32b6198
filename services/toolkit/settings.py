"""Settings of the tools service (``CORRAL_*``, on top of every service's)."""

from __future__ import annotations

from pydantic import Field

from services.runtime.settings import Settings


class ToolsSettings(Settings):
    # Worker threads for synchronous Python tools, and at most this many held by one tenant
    # (calls past their deadline included: a thread cannot be stopped), services/toolkit/threads.py.
    tool_threads: int = Field(default=16, ge=1)
    tool_threads_per_tenant: int = Field(default=4, ge=1)
    # Async Python tools (services/toolkit/isolation.py): one whose step (the code between two
    # awaits) holds the service's event loop longer than this is quarantined, its later calls run
    # on an event loop of the calling tenant's own, in a thread; the tools named here ("*": every
    # async tool; a JSON list in the env) run there from their first call. At most this many such
    # loops at once, and this many calls on one tenant's (calls past their deadline included).
    tool_loop_block_ms: float = Field(default=100.0, gt=0)
    tool_isolated: tuple[str, ...] = ()
    tool_isolation_loops: int = Field(default=32, ge=1)
    tool_isolated_calls_per_tenant: int = Field(default=8, ge=1)

    @classmethod
    def of(cls, settings: Settings) -> ToolsSettings:
        return settings if isinstance(settings, cls) else cls(**settings.model_dump())
