"""The monitor's wiring on the bus and HTTP: the poll loop, the broker reader, the HTTP server."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from contracts import subjects
from contracts.envelope import MonitorQuery
from contracts.errors import Forbidden, InvalidRequest, NotFound
from services.monitor.access import Access, unscoped
from services.monitor.broker import BrokerConnections
from services.monitor.http import build_app, serve
from services.monitor.metrics import registry_for
from services.monitor.poller import StatsPoller
from services.monitor.settings import MonitorSettings
from services.monitor.view import View
from services.runtime.request import Request
from services.runtime.service import Service


def register(service: Service, settings: MonitorSettings, view: View, access: Access) -> None:
    """Start polling and serving when ``service`` starts; ``service.monitor_url`` is then the HTTP base URL."""
    registry = registry_for(view, top_k=settings.monitor_top_k, full_tenants=settings.monitor_full_tenants)
    app = build_app(view, access, registry)
    runner_box: list = []
    loops: list[asyncio.Task] = []

    def run(work) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(work)
        loops.append(task)
        service.keep(task)

    async def start() -> None:
        runner, url = await serve(app, settings.monitor_http)
        runner_box.append(runner)
        service.monitor_url = url  # type: ignore[attr-defined]
        service.log.info("monitor_serving", url=url)
        poller = StatsPoller(
            service.nc, view, settings.monitor_services, window_s=settings.monitor_reply_window_s, log=service.log
        )
        run(_every(settings.monitor_interval_s, poller.poll, service))
        if settings.monitor_broker_http:
            broker = BrokerConnections(settings.monitor_broker_http)
            run(_broker_loop(broker, view, settings.monitor_broker_interval_s, service))
        else:
            service.log.warning("monitor_no_broker_endpoint", reason="no CORRAL_MONITOR_BROKER_HTTP or nats.conf http")

    async def stop() -> None:
        for runner in runner_box:
            await runner.cleanup()

    @service.handler("query")
    async def query(req: Request[MonitorQuery]) -> dict:
        # The tenant is the subject's (the broker lets a connection publish only under its own):
        # nothing in the payload can name another, so no check is needed beyond the runtime's.
        # The scopes are the subject's too: t.<t>.monitor.query.<p>.<scopes>, which the broker
        # lets a connection publish on only with exactly its verified token's scopes.
        tenant = req.tenant
        rest = req.subject.rest  # ("query", <principal>[, <scopes>])
        if len(rest) > 3:
            raise InvalidRequest("a monitor query subject names a principal and at most its scopes")
        scopes = subjects.scopes_of(rest[2]) if len(rest) > 2 else frozenset()
        if (needs := access.needs(tenant, scopes)) is not None:
            raise Forbidden(unscoped(needs))
        if tenant not in view.tenants:
            raise NotFound(f"no figures for tenant {tenant!r} yet")
        answer = view.detail(tenant)
        if req.payload.subjects:
            answer = {**answer, "subjects": view.subjects(tenant)}
        return answer

    if access.jwks is not None:
        service.on_start(access.jwks.refresh)
        service.on_stop(access.jwks.aclose)
    service.on_start(start)
    # Its loops never finish on their own: stopped at once, not awaited like work in flight.
    service.on_draining(lambda: [task.cancel() for task in loops])
    service.on_stop(stop)


async def _every(interval_s: float, work, service: Service) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            service.log.exception("monitor_poll_failed")
        next_at += interval_s
        await asyncio.sleep(max(0.0, next_at - loop.time()))  # a period, not a synchronisation
        next_at = max(next_at, loop.time() - interval_s)


async def _broker_loop(broker: BrokerConnections, view: View, interval_s: float, service: Service) -> None:
    said = False
    try:
        while True:
            try:
                view.set_connections(await broker.read())
                said = False
            except (httpx.HTTPError, ValueError) as error:
                view.set_connections(None)
                if not said:  # once, then on again each time it comes back and goes away
                    service.log.warning("monitor_broker_unreachable", url=broker.base_url, error=str(error)[:200])
                    said = True
            await asyncio.sleep(interval_s)
    finally:
        with contextlib.suppress(Exception):
            await broker.aclose()
