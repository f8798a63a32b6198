"""``corral bench --tenants N``: the request path spread over N tenants against one tenant.

The system it starts has N generated tenants (``t00000`` ...), each with the demo acme's routes
and tools and a rate limit that does not throttle a benchmark (as the demo's ``bench`` tenant),
written as one JSON definitions file into the benchmark's own state directory. Every tenant
connects with its own token on its own connection, all at the same moment (the clients retry a
connect the broker timed out: ``corral/client.py``); then each round runs the ``order_status``
graph request (client -> router -> graph -> tool -> client, as ``corral bench`` does, without
progress events) ``requests`` times with ``concurrency`` in flight, once from the first tenant's
connection alone (``single``) and once spread over all N (``many``: each request on the next
tenant's connection), in alternating order, so both share the machine's noise of that moment.

Reported: ``single_rps`` and ``many_rps`` (medians of the rounds), ``tenant_ratio`` (the median
of the rounds' many over single), the time to connect the N (``connect_total_s``, and the slowest
one, ``connect_slowest_s``; ``connect_retried``: connects the broker timed out and the client
tried again), the broker's memory from its monitoring endpoint (``/varz`` ``mem``) before and
after the N connections and per connection, and how long the system took to start with N
tenants' definitions (``startup_s``). The generated tenants have no demo data, so their
``order_status`` takes its ``not_found`` branch, the same for both sides.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from corral.bench import _throughput
from corral.demo import DEFINITIONS as DEMO_DEFINITIONS
from corral.nats_server import free_port
from services.runtime.credentials import load_secrets

TEMPLATE_TENANT = "acme"
UNTHROTTLED = {"per_second": 1_000_000, "burst": 1_000_000}
DEFINITIONS_FILE = "bench-tenants.json"
ROUNDS = 5


def tenant_ids(count: int) -> list[str]:
    return [f"t{index:05d}" for index in range(count)]


def write_tenant_definitions(folder: Path, count: int) -> list[str]:
    """Write ``count`` tenants like the demo's acme (its routes and tools, unthrottled) into
    ``folder`` as one JSON definitions file; returns their ids."""
    demo = yaml.safe_load((DEMO_DEFINITIONS / "demo.yaml").read_text())
    template = next(policy for policy in demo["tenants"] if policy["tenant"] == TEMPLATE_TENANT)
    names = tenant_ids(count)
    tenants = [{**template, "tenant": name, "rate_limit": UNTHROTTLED} for name in names]
    (folder / DEFINITIONS_FILE).write_text(json.dumps({"tenants": tenants}))
    return names


async def broker_memory(state_dir: Path) -> int:
    """The broker's resident memory in bytes (``/varz`` ``mem``), from the monitoring endpoint
    ``corral init`` enabled in the state directory's nats.conf."""
    address = json.loads((state_dir / "nats.conf").read_text())["http"]
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"http://{address}/varz")
        response.raise_for_status()
        return int(response.json()["mem"])


async def connect_all(url: str, tokens: dict[str, str]) -> tuple[list[Any], dict[str, Any]]:
    """Connect every tenant at the same moment, each with its own token; the clients in the order
    of ``tokens`` and the connect figures. A connect that fails raises (the benchmark stops)."""
    from corral.client import CorralClient

    slowest = 0.0

    async def one(tenant: str, token: str) -> CorralClient:
        nonlocal slowest
        started = time.perf_counter()
        client = await CorralClient.connect(url, tenant=tenant, token=token)
        slowest = max(slowest, time.perf_counter() - started)
        return client

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(one(t, token) for t, token in tokens.items()), return_exceptions=True)
    total = time.perf_counter() - started
    clients = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    if failed:
        await asyncio.gather(*(client.close() for client in clients))
        raise RuntimeError(f"{len(failed)} of {len(tokens)} tenants could not connect, for example: {failed[0]!r}")
    return clients, {
        "connect_total_s": round(total, 2),
        "connect_slowest_s": round(slowest, 2),
        "connect_retried": sum(client.attempts > 1 for client in clients),
    }


async def run_tenants_bench(
    *,
    tenants: int,
    requests: int = 2000,
    concurrency: int = 64,
    rounds: int = ROUNDS,
    quiet: bool = False,
) -> dict[str, Any]:
    """Start a system with ``tenants`` tenants on free ports, connect them all and measure."""
    from corral.state import init_state
    from corral.system import System
    from services.auth.tokens import mint_dev_token

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    samples: dict[str, list[float]] = {"single_rps": [], "many_rps": [], "ratio": []}
    with tempfile.TemporaryDirectory(prefix="corral-bench-tenants-") as scratch:
        state_dir = Path(scratch) / "state"
        port = free_port()
        init_state(state_dir, port=port)  # the demo's definitions, then the generated tenants beside them
        names = write_tenant_definitions(state_dir / "definitions", tenants)
        say(f"starting a system with {tenants} tenants on free ports...")
        started = time.perf_counter()
        system = await System(
            state_dir, port=port, log_dir=Path(scratch) / "logs", env={"CORRAL_LOG_LEVEL": "warning"}
        ).start(timeout=max(60.0, tenants / 50))
        startup_s = time.perf_counter() - started
        clients: list[Any] = []
        try:
            secrets = load_secrets(state_dir)
            tokens = {name: mint_dev_token(name, key=secrets.dev_key, sub=f"user-{name}", ttl_s=3600) for name in names}
            memory_before = await broker_memory(state_dir)
            say(f"connecting {tenants} tenants at once, each with its own token...")
            clients, connected = await connect_all(system.url, tokens)
            memory_after = await broker_memory(state_dir)
            say(
                f"  {tenants} connected in {connected['connect_total_s']} s (slowest "
                f"{connected['connect_slowest_s']} s, {connected['connect_retried']} tried again)"
            )
            single = clients[0]
            turn = 0

            async def single_call() -> Any:
                return await single.request("where is my order?", target="order_status", watch=False, timeout=30)

            async def many_call() -> Any:
                nonlocal turn
                client = clients[turn % len(clients)]
                turn += 1
                return await client.request("where is my order?", target="order_status", watch=False, timeout=30)

            await _throughput(many_call, len(clients), concurrency)  # every tenant's first request, not measured
            sides = (("single", single_call), ("many", many_call))
            for round_number in range(rounds):
                for name, call in sides if round_number % 2 == 0 else sides[::-1]:
                    await _throughput(call, max(50, requests // 10), concurrency)  # warm-up
                    samples[f"{name}_rps"].append(await _throughput(call, requests, concurrency))
                samples["ratio"].append(samples["many_rps"][-1] / samples["single_rps"][-1])
                say(
                    f"round {round_number + 1}: one tenant {samples['single_rps'][-1]:.0f} req/s, "
                    f"{tenants} tenants {samples['many_rps'][-1]:.0f} req/s, ratio {samples['ratio'][-1]:.2f}"
                )
        finally:
            await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
            system.stop()
    report: dict[str, Any] = {
        "tenants": tenants,
        "single_rps": round(statistics.median(samples["single_rps"]), 1),
        "many_rps": round(statistics.median(samples["many_rps"]), 1),
        "tenant_ratio": round(statistics.median(samples["ratio"]), 3),
        "round_ratios": [round(ratio, 3) for ratio in samples["ratio"]],
        **connected,
        "broker_mem_before_bytes": memory_before,
        "broker_mem_after_bytes": memory_after,
        "broker_mem_per_connection_bytes": round((memory_after - memory_before) / tenants),
        "startup_s": round(startup_s, 1),
        "requests": requests,
        "concurrency": concurrency,
        "rounds": rounds,
    }
    return report


def table(report: dict[str, Any]) -> str:
    """The report as a few lines for a terminal."""
    per_connection = report["broker_mem_per_connection_bytes"] / 1024
    return "\n".join(
        [
            f"order_status requests, {report['concurrency']} in flight, {report['rounds']} rounds:",
            f"  one tenant:          {report['single_rps']:8.0f} req/s",
            f"  {report['tenants']:>6} tenants:      {report['many_rps']:8.0f} req/s",
            f"  tenant_ratio (many/single, median of the rounds): {report['tenant_ratio']} {report['round_ratios']}",
            f"connecting {report['tenants']} tenants at once: {report['connect_total_s']} s, slowest "
            f"{report['connect_slowest_s']} s, {report['connect_retried']} tried again",
            f"broker memory: {report['broker_mem_before_bytes'] / 2**20:.0f} MiB -> "
            f"{report['broker_mem_after_bytes'] / 2**20:.0f} MiB ({per_connection:.0f} KiB per connection)",
            f"system start with {report['tenants']} tenants' definitions: {report['startup_s']} s",
        ]
    )
