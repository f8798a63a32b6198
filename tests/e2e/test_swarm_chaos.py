"""Chaos: a conversation survives kill -9 of the swarm replica in the middle of a turn.

Real processes, as ``corral up`` starts them: nats-server with JetStream on disk, auth, router,
tools and the swarm service. The turn is held inside a tool call (an HTTP tool whose server
answers only when the test lets it) when the swarm replica is killed; a new replica starts.
The interrupted turn leaves nothing in the session; once its claim lapses (a second here) the
next turn goes on from the last turn that finished.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import nats
import pytest
import yaml

from contracts.errors import Conflict, DeadlineExceeded, Unavailable
from corral.client import CorralClient
from corral.nats_server import NatsServer, free_port
from corral.state import init_state
from services.auth.tokens import mint_dev_token
from tests.e2e.test_workflow_chaos import Processes
from tests.support.brokers import SecuredBroker
from tests.support.http import Received, Reply, http_server


def definitions(folder: Path, api: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "tools": [{"name": "slow", "http": {"method": "GET", "url": f"{api}/slow"}, "parameters": {"type": "object"}}],
        "models": [
            {
                "name": "helper_model",
                "scripted": {
                    "rules": [
                        {"contains": "slow", "reply": {"tool_call": {"name": "slow", "arguments": {}}}},
                        {"contains": "done", "reply": "The slow thing is done."},
                    ],
                    "default": "Hello again.",
                },
            }
        ],
        "agents": [{"name": "helper", "model": "helper_model", "tools": ["slow"]}],
        "tenants": [
            {"tenant": "acme", "routes": {"chat": {"pattern": "orchestrator", "agent": "helper"}}, "tools": ["slow"]}
        ],
    }
    (folder / "chat.yaml").write_text(yaml.safe_dump(document))
    return folder


@pytest.mark.timeout(180)
async def test_a_session_goes_on_after_kill_9_of_its_replica_mid_turn(tmp_path):
    entered, release = threading.Event(), threading.Event()

    def route(request: Received) -> Reply:
        entered.set()
        return Reply(body={"status": "done"}, wait=release)

    state = tmp_path / "state"
    port = free_port()
    secrets = init_state(state, port=port, demo=False)
    broker = NatsServer(config=state / "nats.conf", port=port, log_file=state / "nats.log").start()
    with http_server(route) as server:
        logs = tmp_path / "logs"
        logs.mkdir()
        procs = Processes(broker.url, state, definitions(tmp_path / "definitions", server.url), logs)
        procs.env["CORRAL_SWARM_CLAIM_S"] = "1"
        client = None
        try:
            for name in ("auth", "router", "tools", "swarm"):
                procs.start(name, name)
            # Every service serves before the first turn: a turn whose tool's service is not up
            # yet gets 'unavailable' back, which this model answers by calling the tool again.
            await procs.serving(SecuredBroker(broker.url, state, secrets), "router", "tools", "swarm")
            token = mint_dev_token("acme", key=secrets.dev_key, ttl_s=3600)

            client, first = await _first_answer(broker.url, token, time.monotonic() + 60)
            session = first.output["session"]

            interrupted = asyncio.create_task(client.request("slow please", target="chat", session=session, timeout=5))
            assert await asyncio.to_thread(entered.wait, 30), "the turn never reached its tool"
            procs.kill("swarm")  # mid-turn: inside the tool call
            procs.start("swarm", "swarm")
            release.set()
            with pytest.raises((DeadlineExceeded, Unavailable)):
                await interrupted

            deadline = time.monotonic() + 60
            while True:  # the claim of the killed turn lapses within a second of its last renewal
                try:
                    following = await client.request("hello", target="chat", session=session, timeout=5)
                    break
                except (Conflict, DeadlineExceeded, Unavailable):
                    assert time.monotonic() < deadline, "the session never took another turn"
                    await asyncio.sleep(0.2)
            kept = await _session(broker.url, secrets.passwords["swarm"], session)
        finally:
            if client is not None:
                await client.close()
            procs.stop_all()
            broker.stop()
    assert following.output["session"] == session and following.output["message"] == "Hello again."
    # The session went on from the first turn: the interrupted turn left nothing in it.
    assert [m["content"] for m in kept["messages"] if m["role"] == "user"] == ["hello", "hello"]
    assert kept["turns"] == 2 and kept.get("busy") is None


async def _session(url: str, password: str, session: str) -> dict:
    # As the swarm service reads it (no other user may).
    nc = await nats.connect(url, user="swarm", password=password, inbox_prefix=b"_INBOX._swarm")
    try:
        sessions = await nc.jetstream().key_value("SWARM_SESSIONS")
        return json.loads((await sessions.get(f"acme.{session}")).value)
    finally:
        await nc.close()


async def _first_answer(url: str, token: str, deadline: float):
    """A connected client and the answer of a first turn, once the system is up."""
    client = None
    while True:
        try:
            client = client or await CorralClient.connect(url, tenant="acme", token=token)
            return client, await client.request("hello", target="chat", timeout=5)
        except Exception:  # not up yet: the broker refuses, or nothing serves the router or the swarm
            assert time.monotonic() < deadline, "the system did not come up"
            await asyncio.sleep(0.2)
