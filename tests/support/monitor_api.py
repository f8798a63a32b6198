"""A stand-in for the monitor's HTTP API (services/monitor): the JSON contract with figures that
move on every call, the static page at / and /static/<file>, bearer tokens checked.

Used with :func:`tests.support.http.http_server` as its ``route``: ``http_server(FakeMonitor())``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.http import Received, Reply

STATIC = Path(__file__).resolve().parents[2] / "services" / "monitor" / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
OPERATOR_TOKEN = "operator-token"
WINDOW = 60
# tenant -> (base rate in msg/s, errors a second, denials a second, p50 ms)
TENANTS = {"acme": (42.0, 0.0, 0.0, 3.1), "globex": (118.0, 0.2, 0.0, 4.4), "initech": (7.5, 0.0, 0.05, 2.2)}
FAMILIES = (("router", "request"), ("graph", "run"), ("tools", "call"), ("auth", "callout"))


def error(status: int, code: str, message: str) -> Reply:
    return Reply(status, {"error": {"code": code, "message": message}})


@dataclass
class FakeMonitor:
    """Each API answer is one tick later than the last: rates, latencies and counts change."""

    token: str = OPERATOR_TOKEN
    ticks: int = 0
    calls: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: Received) -> Reply:
        url = urlsplit(request.path)
        if url.path == "/" or url.path.startswith("/static/"):
            return self.static(url.path)
        if request.headers.get("authorization") != f"Bearer {self.token}":
            if "authorization" not in request.headers:
                return error(401, "unauthorized", "no bearer token: pass Authorization: Bearer <token>")
            return error(401, "unauthorized", "the token is not valid here (expired, or signed by another key)")
        with self.lock:
            self.ticks += 1
            self.calls.append(url.path)
            tick = self.ticks
        query = parse_qs(url.query)
        if url.path == "/api/tenants":
            limit = int(query["limit"][0]) if "limit" in query else None
            return Reply(body=self.tenants(tick, limit))
        if url.path.startswith("/api/tenants/"):
            tenant = url.path.removeprefix("/api/tenants/")
            if tenant not in TENANTS:
                return error(404, "not_found", f"no tenant {tenant!r} seen in the window")
            return Reply(body=self.detail(tenant, tick))
        if url.path == "/api/subjects":
            tenant = query.get("tenant", [""])[0]
            if tenant not in TENANTS:
                return error(404, "not_found", f"no tenant {tenant!r} seen in the window")
            return Reply(body=self.subjects(tenant, tick))
        return error(404, "not_found", f"no such path {url.path}")

    def static(self, path: str) -> Reply:
        name = "index.html" if path == "/" else path.removeprefix("/static/")
        file = (STATIC / name).resolve()
        if file.parent != STATIC or not file.is_file():
            return Reply(404, "not found", "text/plain")
        return Reply(body=file.read_bytes(), content_type=CONTENT_TYPES.get(file.suffix, "application/octet-stream"))

    # ---- the contract's answers, as functions of the tick ---------------------------------

    @staticmethod
    def rate(tenant: str, second: float) -> float:
        base = TENANTS[tenant][0]
        return round(base * (1 + 0.3 * math.sin(second / 3 + len(tenant))), 2)

    def row(self, tenant: str, tick: int) -> dict[str, Any]:
        _, errors, denials, p50 = TENANTS[tenant]
        rate = self.rate(tenant, tick)
        return {
            "tenant": tenant,
            "rate": rate,
            "messages": int(rate * WINDOW),
            "errors": int(errors * WINDOW) + (tick % 3 if errors else 0),
            "refusals": 0,
            "denials": int(denials * WINDOW) + (tick % 2 if denials else 0),
            "p50_ms": round(p50 + 0.1 * (tick % 5), 2),
            "p99_ms": round(p50 * 4 + (tick % 7), 2),
            "in_flight": tick % 4,
            "connections": 3,
        }

    def tenants(self, tick: int, limit: int | None = None) -> dict[str, Any]:
        rows = sorted((self.row(name, tick) for name in TENANTS), key=lambda row: -row["rate"])
        return {"window_s": WINDOW, "updated_at": 1_760_000_000 + tick, "tenants": rows[:limit] if limit else rows}

    def detail(self, tenant: str, tick: int) -> dict[str, Any]:
        _, errors, denials, p50 = TENANTS[tenant]
        seconds = range(tick - WINDOW + 1, tick + 1)
        series = {
            "rate": [self.rate(tenant, s) for s in seconds],
            "p50_ms": [round(p50 + 0.5 * math.sin(s / 4), 2) for s in seconds],
            "p99_ms": [round(p50 * 4 + 2 * math.sin(s / 5), 2) for s in seconds],
            "errors": [int(s % 7 == 0) if errors else 0 for s in seconds],
            "denials": [int(s % 11 == 0) if denials else 0 for s in seconds],
        }
        return {
            "tenant": tenant,
            "window_s": WINDOW,
            "updated_at": 1_760_000_000 + tick,
            "series": series,
            "totals": self.row(tenant, tick),
            "errors_by_code": {"tool_failed": sum(series["errors"])} if errors else {},
            "refusals_by_kind": {},
            "denials_by_reason": {"wrong_tenant": sum(series["denials"])} if denials else {},
            "patterns": self.patterns(tenant, tick),
            "broker": {"connections": 3, "subscriptions": 6, "slow_consumers": 0, "stalled_connections": 0},
        }

    @staticmethod
    def patterns(tenant: str, tick: int) -> dict[str, Any]:
        """The agent patterns' figures: gauges "now", counts over the window, all moving with the tick."""
        spread = len(tenant)  # each tenant its own figures
        return {
            "graph_runs_active": tick % 3,
            "workflow_runs": {
                "started": 10 + tick,
                "completed": 8 + tick,
                "failed": 1 if TENANTS[tenant][1] else 0,  # the tenant with errors has a failed run
                "cancelled": 1,
            },
            "workflow_runs_open": {"running": tick % 2, "waiting": spread, "sleeping": 2 + tick % 3},
            "workflow_runs_driven": tick % 2,
            "swarm_turns": 20 + 2 * tick,
            "swarm_sessions_started": 4 + tick,
            "swarm_sessions_active": 3 + tick % 4,
            "model_tokens": 1000 + 37 * tick,
            "model_tokens_by_model": {"mini": 700 + 25 * tick, "large": 300 + 12 * tick},
        }

    def subjects(self, tenant: str, tick: int) -> dict[str, Any]:
        rate = self.rate(tenant, tick)
        rows = []
        for share, (service, operation) in zip((1.0, 0.9, 0.6, 0.1), FAMILIES, strict=True):
            rows.append(
                {
                    "family": f"t.{tenant}.{service}.{operation}",
                    "service": service,
                    "operation": operation,
                    "rate": round(rate * share, 2),
                    "messages": int(rate * share * WINDOW),
                    "errors": 1 if service == "tools" and TENANTS[tenant][1] else 0,
                    "p50_ms": round(TENANTS[tenant][3] * share, 2),
                    "p99_ms": round(TENANTS[tenant][3] * share * 4, 2),
                }
            )
        return {"tenant": tenant, "subjects": rows}
