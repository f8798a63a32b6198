"""A long run over a real broker: thousands of recorded steps (no history cap), snapshots that
bound what a replica reads, and a replica replaced mid-run that goes on from the snapshot."""

from __future__ import annotations

import asyncio
import importlib

import pytest
import yaml

from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from services.runtime.settings import Settings
from services.workflow.store import SNAPSHOT_EVERY
from tests.support.services import running_services

STEPS = 2_000


@pytest.fixture
def definitions(tmp_path):
    steps = [
        {
            "name": "s0",
            "kind": "function",
            "callable": "tests.support.workflow_tools:add_one",
            "args": {"value": "$input.value"},
        }
    ]
    steps += [
        {
            "name": f"s{i}",
            "kind": "function",
            "callable": "tests.support.workflow_tools:add_one",
            "args": {"value": f"$s{i - 1}"},
        }
        for i in range(1, STEPS)
    ]
    document = {
        "workflows": [{"name": "long", "steps": steps, "output": f"s{STEPS - 1}"}],
        "tenants": [{"tenant": "acme", "routes": {"long": {"pattern": "workflow", "workflow": "long"}}}],
    }
    folder = tmp_path / "definitions"
    folder.mkdir()
    (folder / "long.yaml").write_text(yaml.safe_dump(document))
    return folder


async def test_a_run_of_thousands_of_steps_completes_and_survives_its_replica_being_replaced(secured, definitions):
    settings = Settings(nats_url=secured.url, state_dir=secured.state_dir, definitions=definitions, log_level="warning")
    build = importlib.import_module("services.workflow.__main__").build
    async with running_services(
        secured.url, secured.state_dir, ("auth", "router", "workflow"), definitions
    ) as services:
        token = mint_dev_token("acme", key=secured.secrets.dev_key)
        client = await CorralClient.connect(secured.url, tenant="acme", token=token)
        replaced = asyncio.get_running_loop().create_future()
        done = 0

        def on_event(event):
            nonlocal done
            if event.type.value == "step_completed":
                done += 1
                if done == STEPS // 2 and not replaced.done():
                    replaced.set_result(None)

        async def replace() -> None:
            # Half-way: the replica stops (hands the run back) and a new one takes it on.
            await replaced
            await services["workflow"].stop()
            fresh = build(settings)
            await fresh.start()
            services["workflow"] = fresh

        try:
            replacing = asyncio.create_task(replace())
            result = await client.request(target="long", input={"value": 0}, timeout=180, on_event=on_event)
            await replacing
            assert result.output == STEPS
            shown = await client.show(result.run_id)
            endpoints = {e["name"]: e for e in services["workflow"].stats.snapshot(detail=False)["endpoints"]}
            assert endpoints["task"]["num_requests"] >= 1  # the new replica took the run on
        finally:
            await client.close()
    # run_started, a start and an outcome per step, run_completed: far past one snapshot.
    assert shown["run"]["status"] == "completed" and shown["run"]["events"] == 2 * STEPS + 2
    assert len(shown["events"]) == 2 * STEPS + 2 > 4 * SNAPSHOT_EVERY
    types = [event["type"] for event in shown["events"]]
    # Every step started and completed once: none ran again after the replacement.
    assert types.count("step_started") == types.count("step_completed") == STEPS == done
