"""The monitor's HTTP server: ``/metrics`` (Prometheus), the JSON API, and the page's files.

Every ``/api`` and ``/metrics`` request needs ``Authorization: Bearer <token>`` (see
``access.py``); errors are ``{"error": {"code": ..., "message": ...}}`` with 401, 403 or 404. The
page under ``/`` and ``/static/`` is plain files from ``services/monitor/static/`` (no figures in
them: the page reads the API with the caller's token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from contracts.errors import CorralError, ErrorCode, Forbidden, NotFound
from services.monitor.access import Access, Viewer
from services.monitor.view import View
from services.monitor.window import SLOTS

STATIC = Path(__file__).parent / "static"
_STATUS = {ErrorCode.UNAUTHORIZED: 401, ErrorCode.FORBIDDEN: 403, ErrorCode.NOT_FOUND: 404}


def build_app(view: View, access: Access, registry: CollectorRegistry, static: Path = STATIC) -> web.Application:
    async def viewer(request: web.Request) -> Viewer:
        return await access.viewer_of(request.headers.get("Authorization"))

    async def metrics(request: web.Request) -> web.Response:
        if not (await viewer(request)).operator:
            raise Forbidden("the metrics are the operator's: send the operator's token")
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def tenants(request: web.Request) -> web.Response:
        who = await viewer(request)
        limit = _limit(request.query.get("limit"))
        if not who.operator:
            who.check(who.tenant)  # type: ignore[arg-type]  # a principal-scoped tenant's user without the scope
        only = None if who.operator else [who.tenant]
        return _json(
            {"window_s": SLOTS, "updated_at": view.updated_at, "tenants": view.rows(only, limit)}  # type: ignore[arg-type]
        )

    async def tenant(request: web.Request) -> web.Response:
        name = request.match_info["tenant"]
        (await viewer(request)).check(name)
        if name not in view.tenants:
            raise NotFound(f"no figures for tenant {name[:64]!r}")
        return _json(view.detail(name))

    async def subjects(request: web.Request) -> web.Response:
        who = await viewer(request)
        name = request.query.get("tenant") or who.tenant
        if not name:
            raise NotFound("name a tenant: /api/subjects?tenant=<tenant>")
        who.check(name)
        if name not in view.tenants:
            raise NotFound(f"no figures for tenant {name[:64]!r}")
        return _json({"tenant": name, "subjects": view.subjects(name)})

    base = static.resolve()

    async def page(request: web.Request) -> web.StreamResponse:
        relative = request.match_info.get("path", "index.html")
        target = (base / relative).resolve()
        if not target.is_relative_to(base) or not target.is_file():
            raise NotFound("no such file")
        return web.FileResponse(target)

    app = web.Application(middlewares=[_errors])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/tenants", tenants)
    app.router.add_get("/api/tenants/{tenant}", tenant)
    app.router.add_get("/api/subjects", subjects)
    app.router.add_get("/", page)
    app.router.add_get("/static/{path:.+}", page)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except CorralError as error:
        status = _STATUS.get(error.code, 400)
        return _json({"error": {"code": error.code.value, "message": error.message}}, status=status)
    except web.HTTPNotFound:
        return _json({"error": {"code": "not_found", "message": "no such path"}}, status=404)


def _limit(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return max(0, int(value))
    except ValueError:
        return None


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


async def serve(app: web.Application, address: str) -> tuple[web.AppRunner, str]:
    """Start serving on ``host:port`` (port 0: a free one); returns the runner and the base URL."""
    host, _, port = address.rpartition(":")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host or "127.0.0.1", int(port))
    await site.start()
    bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]  # the real port
    return runner, f"http://{bound[0]}:{bound[1]}"
