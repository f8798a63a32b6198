"""The monitor gathers every service's per-tenant figures on a real broker and serves them."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from services.runtime.credentials import load_secrets
from tests.support.services import running_services


@pytest.fixture
async def system(secured, monkeypatch):
    monkeypatch.setenv("CORRAL_MONITOR_HTTP", "127.0.0.1:0")
    monkeypatch.setenv("CORRAL_MONITOR_TOP_K", "1")
    names = ("auth", "router", "graph", "tools", "monitor")
    async with running_services(secured.url, secured.state_dir, names) as services:
        yield secured, services["monitor"].monitor_url, load_secrets(secured.state_dir).monitor_operator_token


async def until(check, *, timeout: float = 20.0):
    """Poll ``check`` (an async callable returning a value or None) until it gives a value."""
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.2)  # polling with a deadline


async def test_the_monitor_shows_each_tenants_traffic_and_exposes_prometheus_metrics(system):
    broker, url, operator = system
    clients = {
        tenant: await CorralClient.connect(
            broker.url, tenant=tenant, token=mint_dev_token(tenant, key=broker.secrets.dev_key)
        )
        for tenant in ("acme", "globex")
    }
    try:
        for _ in range(3):
            await clients["acme"].request("where is my order?", watch=False)
        await clients["globex"].request("where is my order?", watch=False)
    finally:
        for client in clients.values():
            await client.close()
    headers = {"Authorization": f"Bearer {operator}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=5) as http:

        async def both_counted():
            rows = {row["tenant"]: row for row in (await http.get("/api/tenants")).json()["tenants"]}
            done = "acme" in rows and "globex" in rows and rows["acme"]["messages"] == 9
            done = done and rows["globex"]["messages"] == 3
            return rows if done and rows["acme"]["connections"] is not None else None  # the broker's /connz read

        rows = await until(both_counted)
        assert rows["acme"]["errors"] == 0 and rows["acme"]["p99_ms"] is not None
        assert rows["acme"]["rate"] > rows["globex"]["rate"]
        subjects = (await http.get("/api/subjects", params={"tenant": "acme"})).json()["subjects"]
        by_family = {s["family"]: s["messages"] for s in subjects}
        assert by_family["t.acme.router.request"] == 3 and by_family["t.acme.graph.run"] == 3
        detail = (await http.get("/api/tenants/acme")).json()
        assert sum(detail["series"]["rate"]) == 9 and len(detail["series"]["p50_ms"]) == 60
        missing = await http.get("/api/tenants/nobody")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        text = (await http.get("/metrics")).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert all(name.startswith("corral_") for name in families)
    tenants = {s.labels["tenant"] for s in families["corral_messages"].samples}
    assert tenants == {"acme", "_other"}  # top-K is 1 here: globex is folded into _other
    assert "corral_handling_seconds" in families and "corral_auth_connections_authorized" in families
