"""Corral on a NATS cluster: three nodes on this machine, each configured as ``corral up``
configures its broker and routed to the others, JetStream keeping three copies of every stream
and bucket (``CORRAL_JETSTREAM_REPLICAS=3``), the services connected to one node and the
tenants to the others (docs/operations.md, Past one machine)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import nats
import pytest
import yaml
from nats.js.errors import NotFoundError

from contracts.errors import Unavailable
from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from tests.security.test_connection_limits import connect as connect_to
from tests.support.brokers import SecuredBroker, SecuredCluster, secured_cluster
from tests.support.services import running_services

SERVICES = ("auth", "router", "graph", "tools", "workflow")
READY_S = 30.0  # an upper bound: the cluster elects its JetStream leader in a few seconds


async def retried(attempt, retry_if, what: str):
    """``attempt()`` again while what it raises is ``retry_if`` it, within READY_S."""
    deadline = time.monotonic() + READY_S
    while True:
        try:
            return await attempt()
        except Exception as error:
            if not retry_if(error) or time.monotonic() > deadline:
                raise AssertionError(f"not within {READY_S}s: {what}") from error
        await asyncio.sleep(0.05)  # polling a condition with a deadline


def refused(error: Exception) -> bool:
    return "Authorization Violation" in str(error)


async def jetstream_ready(cluster: SecuredCluster) -> None:
    """Until every node's JetStream answers: each has joined the meta group, so a stream of three
    replicas can be placed (with only the leader answering, a service starting at once was
    refused its streams, "no suitable peers for placement", on a loaded machine)."""
    for url in cluster.urls:
        admin = await nats.connect(
            url, user="admin", password=cluster.secrets.passwords["admin"], inbox_prefix=b"_INBOX._admin"
        )

        async def answered(admin: nats.NATS = admin) -> None:
            with contextlib.suppress(NotFoundError):  # an answer, found or not, is ready
                await admin.jetstream().stream_info("KV_TENANTS")

        try:
            await retried(answered, lambda error: True, f"the JetStream of {url} answers")
        finally:
            await admin.close()


@contextlib.contextmanager
def ready_cluster(state_dir: Path) -> Iterator[SecuredCluster]:
    with mock.patch.dict(os.environ, {"CORRAL_JETSTREAM_REPLICAS": "3"}), secured_cluster(state_dir) as nodes:
        asyncio.run(jetstream_ready(nodes))
        yield nodes


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory) -> Iterator[SecuredCluster]:
    """One cluster for the tests that leave it as they found it (it takes seconds to form)."""
    with ready_cluster(tmp_path_factory.mktemp("cluster") / "state") as nodes:
        yield nodes


@pytest.fixture
def cluster(shared_cluster) -> Iterator[SecuredCluster]:
    with mock.patch.dict(os.environ, {"CORRAL_JETSTREAM_REPLICAS": "3"}):
        yield shared_cluster


@pytest.fixture
def own_cluster(tmp_path) -> Iterator[SecuredCluster]:
    """A cluster of the test's own, for one that kills a node."""
    with ready_cluster(tmp_path / "state") as nodes, mock.patch.dict(os.environ, {"CORRAL_JETSTREAM_REPLICAS": "3"}):
        yield nodes


async def client_on(cluster: SecuredCluster, node: int, tenant: str = "acme") -> CorralClient:
    token = mint_dev_token(tenant, key=cluster.secrets.dev_key)
    return await CorralClient.connect(cluster.urls[node], tenant=tenant, token=token)


async def test_tenants_on_other_nodes_are_admitted_and_served_by_services_on_one(cluster):
    async with running_services(cluster.urls[0], cluster.state_dir, SERVICES):
        for node in (1, 2):
            client = await client_on(cluster, node)
            try:
                answer = await client.request("where is my order A-1001?", timeout=20)
                assert "A-1001" in answer.output
            finally:
                await client.close()


async def connect(cluster: SecuredCluster, node: int, tenant: str, opened: list) -> nats.NATS:
    """A raw tenant connection to one node (the connection-limit tests' own, aimed at the node)."""
    return await connect_to(SecuredBroker(cluster.urls[node], cluster.state_dir, cluster.secrets), tenant, opened)


async def test_a_tenants_connection_limit_holds_across_the_nodes(cluster, tmp_path, monkeypatch):
    """Two connections allowed: one on each of two nodes, and the third is refused on the last
    node; once one closes, the next is let in. Each node reports only its own connections: the
    auth service counts them all, and its subscription sweep reads and closes on every node."""
    monkeypatch.setenv("CORRAL_AUTH_SUBSCRIPTIONS_CHECK_S", "0.1")
    folder = tmp_path / "definitions"
    folder.mkdir()
    tenants = {
        "tenants": [
            {"tenant": "capped", "connection": {"max_connections": 2}},
            {"tenant": "fewsubs", "connection": {"max_subscriptions": 2}},
        ]
    }
    (folder / "tenants.yaml").write_text(yaml.safe_dump(tenants))
    opened: list[nats.NATS] = []
    try:
        async with running_services(cluster.urls[0], cluster.state_dir, ("auth",), definitions=folder):
            first = await connect(cluster, 1, "capped", opened)
            await connect(cluster, 2, "capped", opened)
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await connect(cluster, 0, "capped", opened)
            await first.close()
            await retried(
                lambda: connect(cluster, 0, "capped", opened), refused, "admitted once node 1's DISCONNECT is seen"
            )
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await connect(cluster, 1, "capped", opened)
            # Past its subscription limit on node 2: closed by the auth service on node 0.
            at_limit, over = await connect(cluster, 1, "fewsubs", opened), await connect(cluster, 2, "fewsubs", opened)
            for n in range(3):
                await over.subscribe(f"t.fewsubs.events.dev.run{n}")
                if n < 2:
                    await at_limit.subscribe(f"t.fewsubs.events.dev.run{n}")
            await over.flush()

            async def closed() -> None:
                if not over.is_closed:
                    raise nats.errors.Error("Authorization Violation: still open")

            await retried(closed, refused, "the connection past its subscription limit closed")
            await at_limit.flush(timeout=5)
            assert not at_limit.is_closed
    finally:
        for nc in opened:
            await nc.close()


async def test_workflow_runs_finish_when_the_node_the_services_use_is_killed(own_cluster):
    """Every stream and bucket has three copies: with the services' node killed (SIGKILL), they
    reconnect to another node, JetStream elects new leaders, and every run started before
    finishes, each step recorded once."""
    async with running_services(own_cluster.urls[0], own_cluster.state_dir, SERVICES):
        client = await client_on(own_cluster, 1, "bench")
        try:
            steps_done = 0
            mid_way = asyncio.Event()

            def on_event(event) -> None:
                nonlocal steps_done
                if event.type.value == "step_completed":
                    steps_done += 1
                    if steps_done == 4:  # about one step of each run done, four to go
                        mid_way.set()

            slow = {"value": 0, "delay_ms": 300}  # each step takes 0.3 s
            runs = [
                asyncio.create_task(client.request(target="bench_wf", input=slow, timeout=60, on_event=on_event))
                for _ in range(4)
            ]
            await asyncio.wait_for(mid_way.wait(), READY_S)
            own_cluster.servers[0].process.kill()
            results = await asyncio.gather(*runs)
            assert [result.output for result in results] == [5] * 4
            for result in results:
                shown = await retried(
                    lambda run_id=result.run_id: client.show(run_id),
                    lambda error: isinstance(error, Unavailable),  # a stream's new leader being elected
                    "the run shown",
                )
                steps = [e["step"] for e in shown["events"] if e["type"] == "step_completed"]
                assert steps == ["s1", "s2", "s3", "s4", "s5"]
                # A call whose reply went with the node failed at once and was tried again; it
                # did not wait out its 30 s timeout (services/runtime/requests.py, ReplyLost).
                assert not [e for e in shown["events"] if e.get("code") == "deadline_exceeded"]
        finally:
            await client.close()
