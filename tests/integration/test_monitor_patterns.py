"""The monitor shows the agent patterns' figures per tenant (workflow runs, swarm sessions and turns,
model tokens) from the services' own statistics, on a real broker."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from services.runtime.credentials import load_secrets
from tests.integration.test_monitor import until
from tests.support import swarm_tools, workflow_tools
from tests.support.services import running_services

SUPPORT = Path(__file__).resolve().parent.parent / "support"


@pytest.fixture
def monitor_env(monkeypatch):
    monkeypatch.setenv("CORRAL_MONITOR_HTTP", "127.0.0.1:0")


async def _client(broker, tenant: str = "acme") -> CorralClient:
    return await CorralClient.connect(
        broker.url, tenant=tenant, token=mint_dev_token(tenant, key=broker.secrets.dev_key)
    )


def _http(url: str, broker) -> httpx.AsyncClient:
    operator = load_secrets(broker.state_dir).monitor_operator_token
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {operator}"}, timeout=5)


async def test_a_completed_workflow_run_is_counted_started_and_completed(secured, monitor_env):
    workflow_tools.reset()
    names = ("auth", "router", "tools", "workflow", "monitor")
    async with running_services(secured.url, secured.state_dir, names, definitions=SUPPORT / "workflows") as services:
        acme = await _client(secured)
        try:
            result = await acme.request(target="five", input={"value": 1})
        finally:
            await acme.close()
        assert result.output == 6
        async with _http(services["monitor"].monitor_url, secured) as http:

            async def counted():
                response = await http.get("/api/tenants/acme")
                if response.status_code != 200:
                    return None
                runs = response.json()["patterns"]["workflow_runs"]
                return runs if runs["completed"] == 1 else None

            runs = await until(counted)
            assert runs == {"started": 1, "completed": 1, "failed": 0, "cancelled": 0}
            text = (await http.get("/metrics")).text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = {
        s.labels["outcome"]: s.value
        for s in families["corral_workflow_runs"].samples
        if s.name.endswith("_total") and s.labels["tenant"] == "acme"
    }
    assert samples == {"started": 1, "completed": 1}


async def test_a_swarm_turn_counts_a_session_a_turn_and_its_model_tokens(secured, monitor_env):
    swarm_tools.reset()
    names = ("auth", "router", "tools", "graph", "swarm", "monitor")
    async with running_services(secured.url, secured.state_dir, names, definitions=SUPPORT / "swarms") as services:
        acme = await _client(secured)
        try:
            first = await acme.request("Where is my order?", target="support")
            second = await acme.request("and my order again?", target="support", session=first.output["session"])
        finally:
            await acme.close()
        tokens = first.output["tokens"] + second.output["tokens"]  # what the turns report using
        async with _http(services["monitor"].monitor_url, secured) as http:

            async def counted():
                response = await http.get("/api/tenants/acme")
                if response.status_code != 200:
                    return None
                patterns = response.json()["patterns"]
                return patterns if patterns["swarm_turns"] == 2 and patterns["model_tokens"] == tokens else None

            patterns = await until(counted)
            text = (await http.get("/metrics")).text
    assert patterns["swarm_sessions_started"] == 1  # the second turn went on the same session
    assert set(patterns["model_tokens_by_model"]) <= {"triage_model", "orders_model", "billing_model"}
    assert patterns["graph_runs_active"] == 0
    families = {family.name: family for family in text_string_to_metric_families(text)}
    counted_tokens = sum(
        s.value
        for s in families["corral_model_tokens"].samples
        if s.name.endswith("_total") and s.labels["tenant"] == "acme"
    )
    assert counted_tokens == patterns["model_tokens"]
