"""Corral services run in-process against a real broker, for integration tests."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator
from pathlib import Path

from corral.demo import DEFINITIONS as DEFAULT_DEFINITIONS
from services.runtime.service import Service
from services.runtime.settings import Settings


@contextlib.asynccontextmanager
async def running_services(
    url: str, state_dir: Path, names: tuple[str, ...], definitions: Path = DEFAULT_DEFINITIONS, **settings: object
) -> AsyncIterator[dict[str, Service]]:
    """Start each named service (built by its ``__main__.build``) and stop them all afterwards."""
    config = Settings(nats_url=url, state_dir=state_dir, definitions=definitions, log_level="warning", **settings)
    started: dict[str, Service] = {}
    try:
        for name in names:
            build = importlib.import_module(f"services.{name}.__main__").build
            service = build(config)
            await service.start()
            started[name] = service
        yield started
    finally:
        for service in reversed(started.values()):
            await service.stop()
