"""examples/raw_nats.py, the nats-py program of docs/bus.md, run as a newcomer runs it against a
real system: it connects with a token, watches its run's events and prints the result."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import yaml

from corral.demo import DEFINITIONS as DEMO
from services.auth.tokens import mint_dev_token
from tests.support.services import running_services

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "raw_nats.py"


async def run_example(*args: str) -> list[str]:
    """The program's output lines; it runs in a process of its own, needing nothing but nats-py."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-I", str(EXAMPLE), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return out.decode().splitlines()


NAMES = ("auth", "router", "graph", "tools")


async def test_the_raw_nats_py_example_prints_its_runs_events_then_the_result(secured):
    async with running_services(secured.url, secured.state_dir, NAMES):
        token = mint_dev_token("acme", key=secured.secrets.dev_key, sub="alice@example.com")
        lines = await run_example(secured.url, "acme", token, "where is my order?")
    events = [line.split()[1] for line in lines if line.startswith("event ")]
    nodes = ["node_started", "node_completed"] * 2  # lookup, answer
    assert events == ["accepted", "started", *nodes, "completed"]
    kind, payload = lines[-1].split(" ", 1)
    assert kind == "result" and json.loads(payload)["output"].startswith("Order A-")


async def test_the_example_works_for_a_tenant_whose_users_are_scoped_to_their_own_principal(secured, tmp_path):
    """It uses the principal's own inbox and events, the only ones such a user may read."""
    demo = yaml.safe_load((DEMO / "demo.yaml").read_text())
    route = {"order_status": {"pattern": "graph", "graph": "order_status"}}
    tenant = {"tenant": "acme", "default_route": "order_status", "routes": route, "tools": ["orders_lookup"]}
    scoped = {"tools": demo["tools"], "graphs": demo["graphs"], "tenants": [{**tenant, "principal_scoped": True}]}
    (tmp_path / "scoped.yaml").write_text(yaml.safe_dump(scoped))
    async with running_services(secured.url, secured.state_dir, NAMES, definitions=tmp_path / "scoped.yaml"):
        token = mint_dev_token("acme", key=secured.secrets.dev_key, sub="bob")
        lines = await run_example(secured.url, "acme", token)
    assert lines[-1].startswith("result ") and "Order A-" in lines[-1]
