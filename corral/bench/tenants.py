"""``corral bench --tenants N``: the request path spread over N tenants against one tenant.

The system it starts has N generated tenants (``t00000`` ...), each with the demo acme's routes
and tools and a rate limit that does not throttle a benchmark (as the demo's ``bench`` tenant),
written as one JSON definitions file into the benchmark's own state directory. Every tenant
connects with its own token on its own connection, all at the same moment (the clients take turns
at their handshakes and retry a connect the broker timed out: ``corral/client.py``). Each round
then runs the ``order_status`` graph request (client -> router -> graph -> tool -> client, as
``corral bench`` does, without progress events) ``requests`` times with ``concurrency`` in flight
on each side, in an order that alternates between rounds, so all share the machine's noise:

- ``single``: one tenant on one connection;
- ``spread``: the same tenant on ``concurrency`` connections, each request on the next one;
- ``many``: the N tenants, each request on the next tenant's connection.

``tenant_ratio`` is many over single, the median of the rounds' (the issue's measure). One
connection carries many requests per write and per read at every hop, which ``concurrency``
connections cannot, so ``tenant_ratio_same_connections`` (many over spread) is what the tenants
themselves cost. Each round measures the three once more with the monitor paused (SIGSTOP, as
``corral bench`` measures its share): it polls every service's per-tenant statistics each second,
a cost that grows with the tenants the services know (the ``_unmonitored`` figures).

``cpu_us_per_request`` says where each side's requests went: every process's CPU time (the
broker, each service replica, this process with the tenants' connections) over the measured
requests, in µs per request, the rounds' median. Many against spread is what the tenants cost
each process, spread against single what the connections do.

Also reported: the time to connect the N (``connect_total_s``, the slowest connect
``connect_slowest_s``, ``connect_retried``: connects the broker timed out that the client tried
again), the broker's memory from its monitoring endpoint (``/varz`` ``mem``) before and after
the N connections and per connection, and how long the system took to start with N tenants'
definitions (``startup_s``). The generated tenants have no demo data: ``order_status`` takes its
``not_found`` branch, on every side. The tools service's loop-block threshold is raised to 2 s
(``CORRAL_TOOL_LOOP_BLOCK_MS``): with thousands of connections in this process the cores are
oversubscribed, and a step of the demo's async ``orders_lookup`` held up for 100 ms quarantined
it, after which the single side's 64 requests in flight were refused past its 8 isolated calls.
A step only preempted no longer counts (``services/toolkit/isolation.py`` ``held_the_loop``), but
one that waited that long for the interpreter lock, which the service's other threads take in
turn, still does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from corral.bench import _throughput
from corral.bench.cpu import process_cpu_s
from corral.demo import DEFINITIONS as DEMO_DEFINITIONS
from corral.nats_server import free_port
from services.runtime.credentials import load_secrets

TEMPLATE_TENANT = "acme"
UNTHROTTLED = {"per_second": 1_000_000, "burst": 1_000_000}
DEFINITIONS_FILE = "bench-tenants.json"
ROUNDS = 5
SIDES = ("single", "spread", "many")
PARTS = ("", "_unmonitored")
# The system's settings for the benchmark (see the module's docstring for the tools' threshold).
ENVIRONMENT = {"CORRAL_LOG_LEVEL": "warning", "CORRAL_TOOL_LOOP_BLOCK_MS": "2000"}


def tenant_ids(count: int) -> list[str]:
    return [f"t{index:05d}" for index in range(count)]


def write_tenant_definitions(folder: Path, count: int, *, first_connections: int = 64) -> list[str]:
    """Write ``count`` tenants like the demo's acme (its routes and tools, unthrottled) into
    ``folder`` as one JSON definitions file; the first may hold ``first_connections`` (the spread
    side's); returns their ids."""
    demo = yaml.safe_load((DEMO_DEFINITIONS / "demo.yaml").read_text())
    template = next(policy for policy in demo["tenants"] if policy["tenant"] == TEMPLATE_TENANT)
    names = tenant_ids(count)
    tenants = [{**template, "tenant": name, "rate_limit": UNTHROTTLED} for name in names]
    tenants[0]["connection"] = {"max_connections": max(64, first_connections)}
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


async def connect_all(url: str, tokens: Sequence[tuple[str, str]]) -> tuple[list[Any], dict[str, Any]]:
    """Connect every ``(tenant, token)`` at the same moment; the clients in that order and the
    connect figures. A connect that fails raises (the benchmark stops)."""
    from corral.client import CorralClient

    slowest = 0.0

    async def one(tenant: str, token: str) -> CorralClient:
        nonlocal slowest
        started = time.perf_counter()
        client = await CorralClient.connect(url, tenant=tenant, token=token)
        slowest = max(slowest, time.perf_counter() - started)
        return client

    started = time.perf_counter()
    outcomes = await asyncio.gather(*(one(tenant, token) for tenant, token in tokens), return_exceptions=True)
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


def in_turn(clients: Sequence[Any]) -> Callable[[], Awaitable[Any]]:
    """One ``order_status`` request on the next of ``clients`` at each call."""
    turn = 0

    async def call() -> Any:
        nonlocal turn
        client = clients[turn % len(clients)]
        turn += 1
        return await client.request("where is my order?", target="order_status", watch=False, timeout=30)

    return call


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

    samples: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory(prefix="corral-bench-tenants-") as scratch:
        state_dir = Path(scratch) / "state"
        port = free_port()
        init_state(state_dir, port=port)  # the demo's definitions, then the generated tenants beside them
        names = write_tenant_definitions(state_dir / "definitions", tenants, first_connections=concurrency + 1)
        say(f"starting a system with {tenants} tenants on free ports...")
        started = time.perf_counter()
        system = await System(state_dir, port=port, log_dir=Path(scratch) / "logs", env=ENVIRONMENT).start(
            timeout=max(60.0, tenants / 50)
        )
        startup_s = time.perf_counter() - started
        clients: list[Any] = []
        spread: list[Any] = []
        try:
            secrets = load_secrets(state_dir)
            tokens = {name: mint_dev_token(name, key=secrets.dev_key, sub=f"user-{name}", ttl_s=3600) for name in names}
            memory_before = await broker_memory(state_dir)
            say(f"connecting {tenants} tenants at once, each with its own token...")
            clients, connected = await connect_all(system.url, list(tokens.items()))
            memory_after = await broker_memory(state_dir)
            say(
                f"  {tenants} connected in {connected['connect_total_s']} s (slowest "
                f"{connected['connect_slowest_s']} s, {connected['connect_retried']} tried again)"
            )
            spread, _ = await connect_all(system.url, [(names[0], tokens[names[0]])] * concurrency)
            calls = {"single": in_turn(clients[:1]), "spread": in_turn(spread), "many": in_turn(clients)}
            await _throughput(calls["many"], len(clients), concurrency)  # every tenant's first request, not measured
            monitors = [child.process.pid for child in system.processes if child.name == "monitor"]

            processes = {f"{child.name}{child.replica}": child.process.pid for child in system.processes}
            processes["client"] = os.getpid()  # this process: the N tenants' connections
            if system.broker is not None and system.broker.process is not None:
                processes["broker"] = system.broker.process.pid

            async def measure(part: str, order: Sequence[str]) -> None:
                for side in order:
                    await _throughput(calls[side], max(50, requests // 10), concurrency)  # warm-up
                    before = {name: process_cpu_s(pid) for name, pid in processes.items()}
                    record(f"{side}_rps{part}", await _throughput(calls[side], requests, concurrency))
                    for name, pid in processes.items():
                        spent, earlier = process_cpu_s(pid), before[name]
                        if spent is not None and earlier is not None:
                            record(f"cpu {side}{part} {name}", (spent - earlier) / requests * 1e6)
                record(f"ratio{part}", samples[f"many_rps{part}"][-1] / samples[f"single_rps{part}"][-1])
                record(f"spread_ratio{part}", samples[f"many_rps{part}"][-1] / samples[f"spread_rps{part}"][-1])

            for round_number in range(rounds):
                order = SIDES[round_number % 3 :] + SIDES[: round_number % 3]
                await measure("", order)
                for pid in monitors:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    await measure("_unmonitored", order[::-1])
                finally:
                    for pid in monitors:
                        os.kill(pid, signal.SIGCONT)
                say(
                    f"round {round_number + 1}: "
                    + ", ".join(f"{side} {samples[f'{side}_rps'][-1]:.0f}" for side in SIDES)
                    + f" req/s, tenant_ratio {samples['ratio'][-1]:.2f}; monitor paused: "
                    + ", ".join(f"{samples[f'{side}_rps_unmonitored'][-1]:.0f}" for side in SIDES)
                    + f", {samples['ratio_unmonitored'][-1]:.2f}"
                )
        finally:
            await asyncio.gather(*(client.close() for client in [*clients, *spread]), return_exceptions=True)
            system.stop()

    def median(name: str, digits: int = 1) -> float:
        return round(statistics.median(samples[name]), digits)

    report: dict[str, Any] = {"tenants": tenants}
    for part in PARTS:
        report |= {f"{side}_rps{part}": median(f"{side}_rps{part}") for side in SIDES}
        report[f"tenant_ratio{part}"] = median(f"ratio{part}", 3)
        report[f"tenant_ratio_same_connections{part}"] = median(f"spread_ratio{part}", 3)
    report["round_ratios"] = [round(ratio, 3) for ratio in samples["ratio"]]
    # CPU per request of each process (µs, the rounds' median), by side: what grows with the
    # tenants (many against spread), and with the connections (spread against single).
    report["cpu_us_per_request"] = {
        f"{side}{part}": {
            name.rpartition(" ")[2]: median(name)
            for name in samples
            if name.startswith(f"cpu {side}{part} ") and median(name) >= 1
        }
        for part in PARTS
        for side in SIDES
    }
    return report | {
        **connected,
        "broker_mem_before_bytes": memory_before,
        "broker_mem_after_bytes": memory_after,
        "broker_mem_per_connection_bytes": round((memory_after - memory_before) / tenants),
        "startup_s": round(startup_s, 1),
        "requests": requests,
        "concurrency": concurrency,
        "rounds": rounds,
    }


def table(report: dict[str, Any]) -> str:
    """The report as a few lines for a terminal."""
    lines = [f"order_status requests, {report['concurrency']} in flight, {report['rounds']} rounds (req/s):"]
    labels = {
        "single": "one tenant, one connection",
        "spread": f"one tenant, {report['concurrency']} connections",
        "many": f"{report['tenants']} tenants, one connection each",
    }
    lines.append(f"  {'':<36} {'monitored':>10} {'paused':>10}")
    for side, label in labels.items():
        lines.append(f"  {label:<36} {report[f'{side}_rps']:>10.0f} {report[f'{side}_rps_unmonitored']:>10.0f}")
    lines += [
        f"  tenant_ratio (many/single): {report['tenant_ratio']} {report['round_ratios']}; "
        f"monitor paused {report['tenant_ratio_unmonitored']}",
        f"  same connections (many/spread): {report['tenant_ratio_same_connections']}; "
        f"monitor paused {report['tenant_ratio_same_connections_unmonitored']}",
        f"connecting {report['tenants']} tenants at once: {report['connect_total_s']} s, slowest "
        f"{report['connect_slowest_s']} s, {report['connect_retried']} tried again",
        f"broker memory: {report['broker_mem_before_bytes'] / 2**20:.0f} MiB -> "
        f"{report['broker_mem_after_bytes'] / 2**20:.0f} MiB "
        f"({report['broker_mem_per_connection_bytes'] / 1024:.0f} KiB per connection)",
        f"system start with {report['tenants']} tenants' definitions: {report['startup_s']} s",
        "CPU per request, µs (monitor paused): "
        + "; ".join(
            f"{side} "
            + ", ".join(f"{name} {us:.0f}" for name, us in report["cpu_us_per_request"][f"{side}_unmonitored"].items())
            for side in SIDES
        ),
    ]
    return "\n".join(lines)
