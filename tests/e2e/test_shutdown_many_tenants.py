"""Every service stops within its drain time after load from thousands of tenants, and nothing it
answered is missing from the audit trail.

A system as ``corral up`` starts it, with 2,000 generated tenants (``corral bench --tenants``'s),
each on its own authenticated connection. Every tenant's request goes through the router, the
graph executor and the tools service, so each service holds state and audit records of every
tenant; then, with a second request of every tenant under way, every service gets SIGTERM at
once. Each must exit by itself (status 0, not the SIGKILL that ``System.stop`` sends after the
drain timeout plus ``STOP_MARGIN_S`` plus 2 s); every request must come back at once, answered or
refused with a typed error, never left to wait out its deadline (requests the router passed on
to a graph executor that had just gone did, until the executors' leaving notice); and every tool
call of an answered request must be in its tenant's audit chain, each chain intact. A tools
service under such load once never finished its SIGTERM (its audit writer parked on a wait whose
cancellation Python 3.11's ``asyncio.wait_for`` lost).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter, defaultdict

import nats

from contracts.errors import CorralError
from corral.audit_reader import AuditReport, read_trail_on
from corral.bench.tenants import ENVIRONMENT, connect_all, write_tenant_definitions
from corral.nats_server import free_port
from corral.state import init_state
from corral.system import PAYMENTS, System
from services.auth.tokens import mint_dev_token
from services.runtime.credentials import load_secrets
from services.runtime.service import STOP_MARGIN_S

TENANTS = 2000
DRAIN_S = 2.0
IN_FLIGHT = 256  # requests under way at once (every tenant's in turn)
# System.stop's own bound before it kills a service: what "exits within its drain time" allows.
EXIT_BOUND_S = DRAIN_S + STOP_MARGIN_S + 2.0


async def test_every_service_exits_by_itself_after_load_from_thousands_of_tenants_and_loses_no_audit_record(
    tmp_path,
):
    state_dir = tmp_path / "state"
    port = free_port()
    init_state(state_dir, port=port)
    names = write_tenant_definitions(state_dir / "definitions", TENANTS)
    env = {**ENVIRONMENT, "CORRAL_DRAIN_TIMEOUT_S": str(DRAIN_S)}
    system = await System(state_dir, port=port, log_dir=tmp_path / "logs", env=env).start(timeout=120)
    clients: list = []
    try:
        secrets = load_secrets(state_dir)
        tokens = [(name, mint_dev_token(name, key=secrets.dev_key, sub=f"user-{name}", ttl_s=600)) for name in names]
        clients, _ = await connect_all(system.url, tokens)
        gate = asyncio.Semaphore(IN_FLIGHT)
        answered: dict[str, list[str]] = defaultdict(list)  # tenant -> run ids answered
        refused: list[str] = []
        count = 0
        # Stop once the second wave is under way: some of it answered, more of it in flight.
        under_way = asyncio.Event()

        async def ask(client) -> None:
            async with gate:
                try:
                    result = await client.request("where is my order?", target="order_status", watch=False, timeout=20)
                except CorralError as error:  # typed: the service was stopping
                    refused.append(error.code.value)
                    return
                answered[client.tenant].append(result.run_id)
                nonlocal count
                count += 1
                if count >= TENANTS + IN_FLIGHT:
                    under_way.set()

        await asyncio.gather(*(ask(client) for client in clients))
        assert not refused and len(answered) == TENANTS  # every tenant reached every service

        second = [asyncio.create_task(ask(client)) for client in clients]
        await asyncio.wait_for(under_way.wait(), timeout=60)
        services = [child for child in system.processes if child.name != PAYMENTS]
        for child in services:
            child.process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        late = []
        for child in services:
            try:
                status = await asyncio.to_thread(
                    child.process.wait, max(0.1, EXIT_BOUND_S - (time.monotonic() - stopped_at))
                )
            except subprocess.TimeoutExpired:
                late.append(f"{child.name}{child.replica}")
                continue
            assert status == 0, f"{child.name}{child.replica} exited with {status}: {child.tail()}"
        assert not late, f"still running {EXIT_BOUND_S} s after SIGTERM: {late}"
        done, pending = await asyncio.wait(second, timeout=30)
        assert not pending, "a request never came back"
        for task in done:
            task.result()  # every outcome was an answer or a typed error
        # ... and a prompt one: no request was passed on to an executor that had gone, to wait out
        # its deadline (the router hears each executor's leaving notice: services/runtime/liveness.py).
        assert "deadline_exceeded" not in refused, Counter(refused)

        # Every tool call of an answered request is in its tenant's chain, and every chain verifies.
        nc = await nats.connect(
            system.url, user="admin", password=secrets.passwords["admin"], inbox_prefix=b"_INBOX._admin"
        )
        try:
            trails = await read_trails(nc, list(answered))
        finally:
            await nc.close()
        missing = []
        for tenant, runs in answered.items():
            report = trails[tenant]
            assert report.problems == [], (tenant, report.problems)
            recorded = {
                record.run_id for record in report.records if record.service == "tools" and record.action == "tool_call"
            }
            missing += [(tenant, run) for run in runs if run not in recorded]
        assert not missing, f"{len(missing)} answered requests have no tool call in the audit trail: {missing[:5]}"
    finally:
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
        system.stop()


async def read_trails(nc, tenants) -> dict[str, AuditReport]:
    """Each tenant's chain as ``corral audit`` reads it (the operator may read the stream, not
    make consumers on it), a few tenants at a time."""
    gate = asyncio.Semaphore(32)

    async def one(tenant: str) -> AuditReport:
        async with gate:
            return await read_trail_on(nc, tenant)

    return dict(zip(tenants, await asyncio.gather(*(one(tenant) for tenant in tenants)), strict=True))
