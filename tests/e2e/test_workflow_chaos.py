"""Chaos: workflow runs survive kill -9 of workflow replicas at random points and a broker
restart, and every side effect happens exactly once.

Real processes throughout: a nats-server with JetStream on disk, the auth, router and tools
services, and two workflow replicas, all started as ``corral up`` starts them. The side effects
go to a real HTTP server that honours idempotency keys (the way a payment API does): a repeated
key is answered with the first result and not applied again; the server counts what it applied.
One of the three calls is a ``local`` step's, made by the workflow replica that is killed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from corral.client import CorralClient
from corral.nats_server import NatsServer, free_port
from corral.state import init_state
from corral.system import service_command, service_environment
from services.auth.tokens import mint_dev_token
from tests.support.brokers import SecuredBroker
from tests.support.http import Received, Reply, http_server
from tests.support.services import answering

RUNS = 24
STEP_DELAY_S = 0.03  # the payment API's latency: runs are mid-way when a replica dies


class PaymentApi:
    """Applies each idempotency key once; a repeat gets the first answer back."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.applied: Counter[str] = Counter()  # (path, key) applied
        self.requests: Counter[str] = Counter()  # every request, repeats included
        self.progress = threading.Condition(self.lock)

    def route(self, request: Received) -> Reply:
        time.sleep(STEP_DELAY_S)
        key = request.headers.get("idempotency-key")
        if key is None:
            return Reply(status=400, body={"error": "Idempotency-Key required"})
        with self.lock:
            self.requests[f"{request.path} {key}"] += 1
            if self.applied[f"{request.path} {key}"] == 0:
                self.applied[f"{request.path} {key}"] = 1
            self.progress.notify_all()
        return Reply(body={"ok": True, "key": key})

    def wait_for(self, count: int, timeout: float = 60) -> None:
        with self.progress:
            assert self.progress.wait_for(lambda: sum(self.applied.values()) >= count, timeout), "no progress"


def definitions(folder: Path, api: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    http = lambda path: {"method": "POST", "url": f"{api}/{path}", "retries": 3}  # noqa: E731
    document = {
        "tools": [
            {"name": "charge", "http": http("charge"), "parameters": {"type": "object"}},
            {"name": "ship", "http": http("ship"), "parameters": {"type": "object"}},
            {"name": "notify", "http": http("notify"), "parameters": {"type": "object"}},
        ],
        "workflows": [
            {
                "name": "order",
                "steps": [
                    {"name": "charge", "kind": "tool", "tool": "charge", "args": {"order": "$input.order"}},
                    # Called in the workflow replica itself: a kill -9 there cuts the call short.
                    {"name": "ship", "kind": "tool", "tool": "ship", "local": True, "args": {"order": "$input.order"}},
                    {"name": "pause", "kind": "sleep", "seconds": 0.2},
                    {"name": "notify", "kind": "tool", "tool": "notify", "args": {"order": "$input.order"}},
                ],
            }
        ],
        "tenants": [
            {
                "tenant": "acme",
                "routes": {"order": {"pattern": "workflow", "workflow": "order"}},
                "tools": ["charge", "ship", "notify"],
            }
        ],
    }
    (folder / "chaos.yaml").write_text(yaml.safe_dump(document))
    return folder


class Processes:
    """The services as child processes, each in its own session (killed as a group)."""

    def __init__(self, url: str, state: Path, definitions: Path, logs: Path) -> None:
        self.env = {
            **os.environ,
            **service_environment(url, state, CORRAL_DEFINITIONS=str(definitions), CORRAL_LOG_LEVEL="warning"),
        }
        self.logs = logs
        self.children: dict[str, subprocess.Popen] = {}
        self.services: dict[str, str] = {}

    def start(self, name: str, service: str) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.services[name] = service
        self.children[name] = subprocess.Popen(
            service_command(service, sys.executable), env=self.env, stdout=log, stderr=log, start_new_session=True
        )

    async def serving(self, broker: SecuredBroker, *names: str) -> None:
        """Until each named process answers its service's ping: its subscriptions are in place.
        Started is not serving, and on a busy machine the gap is seconds."""
        nc = await broker.admin()
        try:
            for name in names:
                await answering(nc, self.services[name], self.children[name], timeout=60)
        finally:
            await nc.close()

    def kill(self, name: str) -> None:
        process = self.children.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def stop_all(self) -> None:
        for process in self.children.values():
            with _quiet():
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.children.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.children.clear()


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is ProcessLookupError


async def ready(client_factory, deadline: float) -> CorralClient:
    while True:
        try:
            client = await client_factory()
            await client.runs(timeout=1.0)
            return client
        except Exception:
            assert time.monotonic() < deadline, "the system did not come up"
            await asyncio.sleep(0.1)


async def all_completed(client: CorralClient, run_ids: set[str], deadline: float) -> dict[str, str]:
    while True:
        try:
            runs = {run["run_id"]: run["status"] for run in await client.runs(limit=1000, timeout=2)}
        except Exception:
            runs = {}
        if run_ids <= runs.keys() and all(runs[run] in ("completed", "failed", "cancelled") for run in run_ids):
            return runs
        if time.monotonic() > deadline:
            return runs
        await asyncio.sleep(0.2)


@pytest.mark.timeout(240)
async def test_runs_survive_kill_9_of_workflow_replicas_and_a_broker_restart(tmp_path):
    rng = random.Random(int(os.environ.get("CORRAL_CHAOS_SEED", "7")))
    api = PaymentApi()
    state = tmp_path / "state"
    port = free_port()
    secrets = init_state(state, port=port, demo=False)
    broker = NatsServer(config=state / "nats.conf", port=port, log_file=state / "nats.log").start()
    with http_server(api.route) as server:
        folder = definitions(tmp_path / "definitions", server.url)
        logs = tmp_path / "logs"
        logs.mkdir()
        procs = Processes(broker.url, state, folder, logs)
        client = None
        try:
            for name in ("auth", "router", "tools"):
                procs.start(name, name)
            procs.start("workflow-1", "workflow")
            procs.start("workflow-2", "workflow")
            # Each serves before the first run: a step's call that finds no tools service fails
            # its three attempts within a second.
            await procs.serving(
                SecuredBroker(broker.url, state, secrets), "router", "tools", "workflow-1", "workflow-2"
            )
            token = mint_dev_token("acme", key=secrets.dev_key, ttl_s=3600)

            async def connect() -> CorralClient:
                return await CorralClient.connect(broker.url, tenant="acme", token=token)

            client = await ready(connect, time.monotonic() + 60)
            run_ids: set[str] = set()
            for index in range(RUNS):
                started = await client.request(
                    target="order", input={"order": f"o-{index}"}, follow=False, idempotency_key=f"order-{index}"
                )
                run_ids.add(started.output["run_id"])
            assert len(run_ids) == RUNS

            # kill -9 a workflow replica at random points of progress, restarting each.
            for kill, name in enumerate(("workflow-1", "workflow-2", "workflow-1")):
                await asyncio.to_thread(api.wait_for, (kill + 1) * RUNS // 2 + rng.randrange(RUNS // 2))
                procs.kill(name)
                procs.start(name, "workflow")

            # The broker restarts once, mid-way, with JetStream on disk.
            await asyncio.to_thread(api.wait_for, 2 * RUNS)
            broker.stop()
            broker = NatsServer(config=state / "nats.conf", port=port, log_file=state / "nats.log").start()

            statuses = await all_completed(client, run_ids, time.monotonic() + 120)
        finally:
            if client is not None:
                await client.close()
            procs.stop_all()
            broker.stop()
    unfinished = {run: statuses.get(run) for run in run_ids if statuses.get(run) != "completed"}
    assert not unfinished, f"runs not completed: {unfinished}"
    # Every side effect exactly once: three per run, each applied once, whatever was retried.
    assert sorted(api.applied.values()) == [1] * (3 * RUNS)
    for path in ("/charge", "/ship", "/notify"):
        assert sum(1 for key in api.applied if key.startswith(path + " ")) == RUNS
    print(f"requests seen {sum(api.requests.values())} for {3 * RUNS} side effects")
