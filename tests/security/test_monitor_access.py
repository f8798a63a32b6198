"""Who sees what in the monitor: the operator every tenant, a tenant only its own."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from services.runtime.credentials import load_secrets
from tests.support.services import running_services


@pytest.fixture
async def monitor(secured, monkeypatch):
    monkeypatch.setenv("CORRAL_MONITOR_HTTP", "127.0.0.1:0")
    async with running_services(secured.url, secured.state_dir, ("auth", "router", "graph", "tools", "monitor")) as s:
        url = s["monitor"].monitor_url
        key = secured.secrets.dev_key
        for tenant in ("acme", "globex"):
            client = await CorralClient.connect(secured.url, tenant=tenant, token=mint_dev_token(tenant, key=key))
            await client.request("where is my order?", watch=False)
            await client.close()
        operator = {"Authorization": f"Bearer {load_secrets(secured.state_dir).monitor_operator_token}"}
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            deadline = time.monotonic() + 20
            while len((await http.get("/api/tenants", headers=operator)).json()["tenants"]) < 2:
                assert time.monotonic() < deadline, "the monitor never saw both tenants"
                await asyncio.sleep(0.2)  # polling with a deadline
            yield http, operator, {"Authorization": f"Bearer {mint_dev_token('acme', key=key)}"}


async def test_the_operator_sees_every_tenant(monitor):
    http, operator, _ = monitor
    tenants = {row["tenant"] for row in (await http.get("/api/tenants", headers=operator)).json()["tenants"]}
    assert {"acme", "globex"} <= tenants
    assert (await http.get("/metrics", headers=operator)).status_code == 200


async def test_a_tenants_token_sees_only_its_own_tenant(monitor):
    http, _, acme = monitor
    rows = (await http.get("/api/tenants", headers=acme)).json()["tenants"]
    assert [row["tenant"] for row in rows] == ["acme"]
    assert (await http.get("/api/tenants/acme", headers=acme)).status_code == 200
    assert (await http.get("/api/subjects", params={"tenant": "acme"}, headers=acme)).status_code == 200


async def test_a_tenant_cannot_see_another_tenants_figures(monitor):
    http, _, acme = monitor
    answers = []
    for tenant in ("globex", "initech"):  # one exists, one does not: the same answer
        for reply in (
            await http.get(f"/api/tenants/{tenant}", headers=acme),
            await http.get("/api/subjects", params={"tenant": tenant}, headers=acme),
        ):
            assert reply.status_code == 403 and reply.json()["error"]["code"] == "forbidden"
            answers.append(reply.json())
    assert answers[0] == answers[2] and answers[1] == answers[3]
    assert (await http.get("/metrics", headers=acme)).status_code == 403


async def test_without_a_valid_token_nothing_is_shown(monitor):
    http, _, _ = monitor
    for header in (None, "Bearer", "Bearer not-a-token", "Basic YWRtaW46eA==", "Bearer " + "x" * 5000):
        headers = {} if header is None else {"Authorization": header}
        for path in ("/api/tenants", "/api/tenants/acme", "/api/subjects?tenant=acme", "/metrics"):
            reply = await http.get(path, headers=headers)
            assert reply.status_code == 401 and reply.json()["error"]["code"] == "unauthorized", (header, path)


async def test_an_expired_or_foreign_signed_token_is_refused(monitor):
    http, _, _ = monitor
    for token in (mint_dev_token("acme", key="x" * 32, ttl_s=-120), mint_dev_token("acme", key="another-key" * 4)):
        reply = await http.get("/api/tenants", headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code == 401
