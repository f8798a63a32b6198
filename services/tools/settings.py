"""Settings of the tools service (``CORRAL_*``, on top of every service's)."""

from __future__ import annotations

from pydantic import Field

from services.runtime.settings import Settings


class ToolsSettings(Settings):
    # Worker threads for synchronous Python tools, and at most this many held by one tenant
    # (calls past their deadline included: a thread cannot be stopped), services/tools/threads.py.
    tool_threads: int = Field(default=16, ge=1)
    tool_threads_per_tenant: int = Field(default=4, ge=1)

    @classmethod
    def of(cls, settings: Settings) -> ToolsSettings:
        return settings if isinstance(settings, cls) else cls(**settings.model_dump())
