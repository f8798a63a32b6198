"""The monitor shows what is open right now per tenant, from a census of the shared buckets that
every replica keeps (services/runtime/census.py): workflow runs waiting and sleeping (the run
index, KV WORKFLOW_RUNS) and swarm sessions spoken in within the idle window (KV
SWARM_SESSIONS), on a real broker, not doubled by a second replica. The census itself starts
before its bucket exists and comes back after the broker restarts."""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import pytest
from nats.js.api import KeyValueConfig
from prometheus_client.parser import text_string_to_metric_families

from corral.nats_server import NatsServer, free_port
from services.runtime.census import Census
from services.runtime.service import Service
from services.runtime.settings import Settings
from services.workflow.driver import open_state
from tests.integration.test_monitor import until
from tests.integration.test_monitor_patterns import _client, _http
from tests.support import swarm_tools, workflow_tools
from tests.support.services import running_services

SUPPORT = Path(__file__).resolve().parent.parent / "support"
NOTHING_OPEN = {"running": 0, "waiting": 0, "sleeping": 0}


@pytest.fixture
def monitor_env(monkeypatch):
    monkeypatch.setenv("CORRAL_MONITOR_HTTP", "127.0.0.1:0")


@contextlib.asynccontextmanager
async def another_replica(name: str, broker, definitions: Path) -> AsyncIterator[Service]:
    """One more replica of service ``name``, as running_services builds each."""
    settings = Settings(nats_url=broker.url, state_dir=broker.state_dir, definitions=definitions, log_level="warning")
    service = importlib.import_module(f"services.{name}.__main__").build(settings)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def reports(service: Service, figure: str, tenant: str, wanted) -> None:
    """Wait until a replica's own snapshot (what the monitor reads from it) shows ``wanted`` for
    ``tenant`` (its ``by`` for a keyed figure, else its value)."""

    async def check():
        found = next(f for f in service.stats.snapshot()["figures"] if f["name"] == figure)
        values = found["tenants"].get(tenant, {})
        return (values.get("by") if isinstance(wanted, dict) else values.get("value")) == wanted or None

    await until(check)


async def patterns_when(http: httpx.AsyncClient, wanted) -> dict[str, dict]:
    """Every tenant's patterns once ``wanted(patterns by tenant)`` holds (polling with a deadline)."""

    async def check():
        found = {}
        for tenant in ("acme", "globex"):
            response = await http.get(f"/api/tenants/{tenant}")
            if response.status_code == 200:
                found[tenant] = response.json()["patterns"]
        return found if len(found) == 2 and wanted(found) else None

    return await until(check)


def gauge_samples(text: str, metric: str) -> dict[tuple[str, ...], float]:
    families = {family.name: family for family in text_string_to_metric_families(text)}
    return {
        tuple(value for key, value in sorted(s.labels.items())): s.value for s in families[metric].samples if s.value
    }


async def test_waiting_and_sleeping_runs_are_shown_per_tenant_once_and_dropped_when_finished(secured, monitor_env):
    workflow_tools.reset()
    definitions = SUPPORT / "open_runs"
    names = ("auth", "router", "tools", "workflow", "monitor")
    async with (
        running_services(secured.url, secured.state_dir, names, definitions=definitions) as services,
        another_replica("workflow", secured, definitions) as second,
    ):
        acme, globex = await _client(secured, "acme"), await _client(secured, "globex")
        try:
            waiting = (await acme.request(target="approval", input={}, watch=False)).run_id
            sleeping = (await acme.request(target="nap", input={}, watch=False)).run_id
            await globex.request(target="approval", input={}, watch=False)
            async with _http(services["monitor"].monitor_url, secured) as http:
                shown = await patterns_when(
                    http,
                    lambda p: (
                        p["acme"]["workflow_runs_open"]["sleeping"] == 1
                        and p["acme"]["workflow_runs_open"]["waiting"] == 1
                        and p["globex"]["workflow_runs_open"]["waiting"] == 1
                    ),
                )
                assert shown["acme"]["workflow_runs_open"] == {"running": 0, "waiting": 1, "sleeping": 1}
                assert shown["globex"]["workflow_runs_open"] == {"running": 0, "waiting": 1, "sleeping": 0}
                # Both replicas count the same runs, and the monitor shows them once.
                for replica in (services["workflow"], second):
                    await reports(replica, "workflow_runs_open", "acme", {"waiting": 1, "sleeping": 1})
                metrics = gauge_samples((await http.get("/metrics")).text, "corral_workflow_runs_open")
                assert metrics == {("waiting", "acme"): 1, ("sleeping", "acme"): 1, ("waiting", "globex"): 1}

                await acme.signal(waiting, "approve")
                await acme.cancel(sleeping)
                shown = await patterns_when(http, lambda p: p["acme"]["workflow_runs_open"] == NOTHING_OPEN)
                assert shown["globex"]["workflow_runs_open"] == {"running": 0, "waiting": 1, "sleeping": 0}
                assert shown["acme"]["workflow_runs"]["completed"] == 1
                assert shown["acme"]["workflow_runs"]["cancelled"] == 1
                metrics = gauge_samples((await http.get("/metrics")).text, "corral_workflow_runs_open")
                assert metrics == {("waiting", "globex"): 1}
        finally:
            await acme.close()
            await globex.close()


async def test_swarm_sessions_are_active_per_tenant_until_idle_for_the_buckets_age_limit(secured, monitor_env):
    swarm_tools.reset()
    definitions = SUPPORT / "swarms"
    names = ("auth", "router", "tools", "graph", "swarm", "monitor")
    async with (
        running_services(secured.url, secured.state_dir, names, definitions=definitions) as services,
        another_replica("swarm", secured, definitions) as second,
    ):
        acme, globex = await _client(secured, "acme"), await _client(secured, "globex")
        try:
            first = await acme.request("Where is my order?", target="support")
            await acme.request("and my order again?", target="support", session=first.output["session"])
            await acme.request("What is my balance?", target="support")  # a second session
            await globex.request("Where is my order?", target="support")
        finally:
            await acme.close()
            await globex.close()
        async with _http(services["monitor"].monitor_url, secured) as http:
            shown = await patterns_when(
                http,
                lambda p: p["acme"]["swarm_sessions_active"] == 2 and p["globex"]["swarm_sessions_active"] == 1,
            )
            assert shown["acme"]["swarm_sessions_started"] == 2 and shown["acme"]["swarm_turns"] == 3
            for replica in (services["swarm"], second):
                await reports(replica, "swarm_sessions_active", "acme", 2)
            metrics = gauge_samples((await http.get("/metrics")).text, "corral_swarm_sessions_active")
            assert metrics == {("acme",): 2, ("globex",): 1}
            # Past the bucket's age limit (the idle window) nobody has spoken in them: the broker
            # drops such values without telling a watcher, so the census prunes them itself.
            for replica in (services["swarm"], second):
                census = census_of(replica, "swarm_sessions_active")
                ttl = census.tally.ttl_s
                assert ttl is not None and ttl > 0  # read from the bucket: CORRAL_SWARM_SESSION_IDLE_S
                census.clock = lambda ttl=ttl: time.time() + ttl + 1
            await patterns_when(
                http,
                lambda p: p["acme"]["swarm_sessions_active"] == 0 and p["globex"]["swarm_sessions_active"] == 0,
            )


def census_of(service: Service, figure: str) -> Census:
    """The census behind a replica's shared gauge (its ``read`` is the census's), to move its clock."""
    return service.stats._figures[figure]._read.__self__  # type: ignore[union-attr]


async def test_a_census_starts_before_its_bucket_exists_and_follows_it_across_a_broker_restart(tmp_path):
    port = free_port()
    store = tmp_path / "js"
    broker = NatsServer(args=["-js", "-sd", str(store)], port=port).start()
    nc = await nats.connect(broker.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    census = Census("CENSUS_TEST", open_state)
    try:
        census.start(nc)  # no bucket yet: it keeps trying, in the background
        js = nc.jetstream()
        kv = await js.create_key_value(KeyValueConfig(bucket="CENSUS_TEST", history=1))
        await kv.put("acme.r1", b'{"status": "waiting"}')
        await kv.put("acme.r2", b'{"status": "sleeping"}')
        await kv.put("globex.r3", b'{"status": "running"}')

        async def counted(wanted):
            async def check():
                return census.counts() == wanted or None

            await until(check)

        await counted({"acme": {"waiting": 1, "sleeping": 1}, "globex": {"running": 1}})
        watchers = census.watchers
        broker.close()
        broker = NatsServer(args=["-js", "-sd", str(store)], port=port).start()
        kv = await until(lambda: _bucket(nc))
        await kv.put("acme.r1", b'{"status": "completed"}')
        await kv.delete("globex.r3")
        await kv.put("globex.r4", b'{"status": "waiting"}')
        await counted({"acme": {"sleeping": 1}, "globex": {"waiting": 1}})
        assert census.watchers > watchers  # a new watcher after the reconnect
    finally:
        census.stop()
        await nc.close()
        broker.close()


async def _bucket(nc):
    try:
        return await nc.jetstream().key_value("CENSUS_TEST")
    except Exception:  # JetStream not back yet
        return None
