"""A tenant connection that stops reading becomes a slow consumer: the broker closes it once more
than ``max_pending`` bytes wait for it, and the monitor counts it for that tenant (from the
broker's ``/connz``), not for another tenant that reads the same flood. The client is a raw TCP
socket that connects through the auth callout with the tenant's token, subscribes, and never
reads again; the broker runs with a small ``max_pending`` so that little data is enough."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.nats_server import NatsServer, free_port
from corral.state import init_state
from services.auth.tokens import mint_dev_token
from services.runtime.credentials import service_credentials
from tests.integration.test_monitor import until
from tests.integration.test_monitor_patterns import _client, _http
from tests.support.brokers import SecuredBroker
from tests.support.services import running_services

MAX_PENDING = 256 * 1024  # bytes the broker holds for one connection before closing it
CHUNK = b"x" * 4096


@pytest.fixture
def small_pending_broker(tmp_path: Path) -> Iterator[SecuredBroker]:
    """The broker `corral up` configures, with a small max_pending (and max_payload under it)."""
    state_dir = tmp_path / "state"
    port = free_port()
    secrets = init_state(state_dir, port=port)
    config = json.loads((state_dir / "nats.conf").read_text())
    config |= {"max_payload": 64 * 1024, "max_pending": MAX_PENDING}
    (state_dir / "nats.conf").write_text(json.dumps(config))
    with NatsServer(config=state_dir / "nats.conf", port=port, log_file=state_dir / "nats.log") as server:
        yield SecuredBroker(server.url, state_dir, secrets)


@contextlib.asynccontextmanager
async def reader_that_stops(broker: SecuredBroker, tenant: str, subject: str):
    """A raw client of ``tenant``: CONNECT with its token, SUB ``subject``, PONG read, then
    nothing is ever read again (its receive buffer kept small, so the broker's queue fills)."""
    host, port = broker.url.removeprefix("nats://").rsplit(":", 1)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, int(port)))
        token = mint_dev_token(tenant, key=broker.secrets.dev_key)
        connect = {"verbose": False, "pedantic": False, "auth_token": token, "name": "stops-reading", "protocol": 1}
        await loop.sock_sendall(sock, f"CONNECT {json.dumps(connect)}\r\nSUB {subject} 1\r\nPING\r\n".encode())
        seen = b""
        while b"PONG\r\n" not in seen:
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
            assert data and b"-ERR" not in data, (seen + data)[-300:]
            seen += data
        yield sock
    finally:
        sock.close()


async def test_a_tenant_connection_that_stops_reading_is_counted_as_a_slow_consumer_for_its_tenant(
    small_pending_broker, monkeypatch
):
    broker = small_pending_broker
    monkeypatch.setenv("CORRAL_MONITOR_HTTP", "127.0.0.1:0")
    monkeypatch.setenv("CORRAL_MONITOR_BROKER_INTERVAL_S", "0.2")
    user, password = service_credentials(broker.state_dir, "workflow")  # a service that publishes events
    async with running_services(broker.url, broker.state_dir, ("auth", "monitor")) as services:
        publisher = await nats.connect(broker.url, user=user, password=password, allow_reconnect=False)
        globex = await _client(broker, "globex")  # reads what it is sent: never a slow consumer
        received = 0

        async def on_event(msg) -> None:
            nonlocal received
            received += 1

        await globex.nc.subscribe("t.globex.events.>", cb=on_event)
        await globex.nc.flush()
        try:
            async with (
                reader_that_stops(broker, "acme", "t.acme.events.>"),
                _http(services["monitor"].monitor_url, broker) as http,
            ):

                async def counted():
                    # Each look sends both tenants another 256 KB, until the monitor has counted it.
                    for _ in range(64):
                        await publisher.publish("t.acme.events.flood.x", CHUNK)
                        await publisher.publish("t.globex.events.flood.x", CHUNK)
                    await publisher.flush()
                    shown = {}
                    for tenant in ("acme", "globex"):
                        response = await http.get(f"/api/tenants/{tenant}")
                        if response.status_code != 200:
                            return None
                        shown[tenant] = response.json()["broker"]
                    return shown if shown["acme"]["slow_consumers"] else None

                shown = await until(counted)
                text = (await http.get("/metrics")).text
        finally:
            await publisher.close()
            await globex.close()
    assert shown["acme"]["slow_consumers"] == 1
    assert shown["globex"]["slow_consumers"] == 0 and shown["globex"]["connections"] == 1 and received > 0
    families = {family.name: family for family in text_string_to_metric_families(text)}
    slow = {s.labels["tenant"]: s.value for s in families["corral_broker_slow_consumers"].samples}
    assert slow["acme"] == 1 and slow.get("globex", 0) == 0
    assert "Slow Consumer" in (broker.state_dir / "nats.log").read_text()


async def test_the_brokers_closed_reason_names_it_a_slow_consumer(small_pending_broker):
    """What the monitor reads: the closed connection's reason in /connz (nats-server's own words)."""
    broker = small_pending_broker
    http_address = json.loads((broker.state_dir / "nats.conf").read_text())["http"]
    user, password = service_credentials(broker.state_dir, "workflow")
    async with running_services(broker.url, broker.state_dir, ("auth",)):
        publisher = await nats.connect(broker.url, user=user, password=password, allow_reconnect=False)
        try:
            async with reader_that_stops(broker, "acme", "t.acme.events.>"), httpx.AsyncClient() as http:

                async def closed():
                    for _ in range(64):
                        await publisher.publish("t.acme.events.flood.x", CHUNK)
                    await publisher.flush()
                    params = {"acc": "APP", "auth": "1", "state": "closed"}
                    found = (await http.get(f"http://{http_address}/connz", params=params)).json()["connections"]
                    return [c for c in found or () if c.get("authorized_user", "").startswith("acme/")] or None

                (connection,) = await until(closed)
        finally:
            await publisher.close()
    assert connection["reason"] == "Slow Consumer (Pending Bytes)"
