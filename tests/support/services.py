"""Corral services run in-process against a real broker, for integration tests."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import nats

from contracts import subjects
from corral.demo import DEFINITIONS as DEFAULT_DEFINITIONS
from corral.demo.payments import URL_VARIABLE, serve_in_thread
from services.runtime.service import Service
from services.runtime.settings import Settings


@contextlib.asynccontextmanager
async def running_services(
    url: str, state_dir: Path, names: tuple[str, ...], definitions: Path = DEFAULT_DEFINITIONS, **settings: object
) -> AsyncIterator[dict[str, Service]]:
    """Start each named service (built by its ``__main__.build``) and stop them all afterwards."""
    config = Settings(nats_url=url, state_dir=state_dir, definitions=definitions, log_level="warning", **settings)
    started: dict[str, Service] = {}
    with demo_payments(definitions):
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


async def answering(nc: Any, service: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Poll ``corral.ping.<service>`` on ``nc`` with a deadline until this very process (a
    ``python -m services.<service>`` started by the test) answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"python -m services.{service} exited with {process.returncode}"
        with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
            reply = await nc.request(subjects.ping(service), b"", timeout=0.5)
            if json.loads(reply.data)["pid"] == process.pid:
                return
    raise AssertionError(f"python -m services.{service} did not answer within the deadline")


@contextlib.contextmanager
def demo_payments(definitions: Path) -> Iterator[None]:
    """The demo payments API that the demo definitions' refund tool calls, as `corral up` runs
    it: served on a free loopback port for the block, its URL in the environment (unless the
    test has set one, to watch the refunds itself)."""
    if definitions != DEFAULT_DEFINITIONS or os.environ.get(URL_VARIABLE):
        yield
        return
    with serve_in_thread() as server, mock.patch.dict(os.environ, {URL_VARIABLE: server.url}):
        yield
