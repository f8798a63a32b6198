"""After the broker restarts, the services and a tenant's client come back by themselves: short,
jittered reconnects, a tenant refused while the auth service was not back yet tries again."""

from __future__ import annotations

import asyncio
import time

from corral.client import CorralClient
from corral.nats_server import NatsServer, free_port
from corral.state import init_state
from services.auth.tokens import mint_dev_token
from tests.support.services import running_services


async def answered(client: CorralClient, deadline: float) -> float:
    """Seconds until the client's request is answered again (polling with a deadline)."""
    started = time.monotonic()
    while True:
        try:
            result = await client.request("where is my order?", watch=False, timeout=0.25)
        except Exception:
            assert time.monotonic() < deadline, "no answer after the broker came back"
            await asyncio.sleep(0.02)
            continue
        assert result.output.startswith("Order A-")
        return time.monotonic() - started


async def test_the_system_answers_again_after_the_broker_restarts(tmp_path):
    state = tmp_path / "state"
    port = free_port()
    secrets = init_state(state, port=port)
    broker = NatsServer(config=state / "nats.conf", port=port, log_file=state / "nats.log").start()
    try:
        async with running_services(broker.url, state, ("auth", "router", "graph", "tools")):
            client = await CorralClient.connect(
                broker.url, tenant="acme", token=mint_dev_token("acme", key=secrets.dev_key)
            )
            try:
                await client.request("where is my order?", watch=False)
                broker.stop()
                broker = NatsServer(config=state / "nats.conf", port=port, log_file=state / "nats.log").start()
                recovered = await answered(client, time.monotonic() + 30)
            finally:
                await client.close()
    finally:
        broker.stop()
    # Not a timing assertion (machines differ): the figure is reported, the target is 1 s.
    print(f"answered again {recovered:.2f} s after the broker was back")
