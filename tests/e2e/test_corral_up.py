"""The whole system as a newcomer runs it: `corral up`, then requests as two tenants."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import nats
import pytest

from corral.client import CorralClient
from corral.nats_server import free_port
from services.auth.tokens import mint_dev_token
from services.registry import NAMES
from services.runtime.credentials import load_secrets
from services.runtime.loop import loop_name

CORRAL = [sys.executable, "-m", "corral.cli"]


def start_corral_up(state_dir: Path, *extra: str) -> tuple[dict[str, str], subprocess.Popen]:
    env = {**os.environ, "CORRAL_STATE_DIR": str(state_dir)}
    process = subprocess.Popen(
        [*CORRAL, "up", "--port", str(free_port()), "--log-dir", str(state_dir / "logs"), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return env, process


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"corral up exited early with {process.returncode}: {process.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("corral up did not become ready")
        time.sleep(0.05)  # polling a file with a deadline


@pytest.fixture(scope="module")
def corral_up(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("state")
    env, process = start_corral_up(state_dir)
    try:
        wait_for_file(state_dir / "corral.json", process)
        yield state_dir, env, process
    finally:
        stop_corral_up(process)


def stop_corral_up(process: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops it (SIGKILL after 30 s)."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def corral(env, *args, timeout=60):
    return subprocess.run([*CORRAL, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_corral_request_with_no_flags_answers_from_each_tenants_own_data(corral_up):
    _, env, _ = corral_up
    acme = corral(env, "request", "--tenant", "acme", "where is my order?")
    globex = corral(env, "request", "--tenant", "globex", "where is my order?")
    assert acme.returncode == 0, acme.stderr
    assert globex.returncode == 0, globex.stderr
    assert "A-" in acme.stdout.splitlines()[-1] and "G-" not in acme.stdout
    assert "G-" in globex.stdout.splitlines()[-1] and "A-" not in globex.stdout
    assert "[graph] node_completed lookup" in acme.stdout  # progress events are printed as they arrive


def test_json_output_and_a_non_zero_exit_on_error(corral_up):
    _, env, _ = corral_up
    ok = corral(env, "request", "--tenant", "acme", "--json", "where is my order?")
    report = json.loads(ok.stdout)
    assert report["ok"] and report["output"].startswith("Order A-")
    assert [e["type"] for e in report["events"]][-1] == "completed"

    missing = corral(env, "request", "--tenant", "acme", "--target", "no_such_route", "--json", "x")
    assert missing.returncode != 0
    assert json.loads(missing.stdout) == {
        "ok": False,
        "error": {"code": "not_found", "message": "unknown target 'no_such_route'"},
    }


def test_a_token_minted_by_corral_token_is_accepted(corral_up):
    _, env, _ = corral_up
    token = corral(env, "token", "--tenant", "globex", "--ttl", "120").stdout.strip()
    result = corral(env, "request", "--token", token, "where is my order?")
    assert result.returncode == 0, result.stderr
    assert "G-" in result.stdout


async def test_concurrent_requests_from_two_tenants_each_get_their_own_data(corral_up):
    state_dir, _, _ = corral_up
    url = json.loads((state_dir / "corral.json").read_text())["nats_url"]
    key = load_secrets(state_dir).dev_key
    acme = await CorralClient.connect(url, tenant="acme", token=mint_dev_token("acme", key=key))
    globex = await CorralClient.connect(url, tenant="globex", token=mint_dev_token("globex", key=key))
    try:
        results = await asyncio.gather(
            *[acme.request("where is my order?") for _ in range(20)],
            *[globex.request("where is my order?") for _ in range(20)],
        )
    finally:
        await acme.close()
        await globex.close()
    assert all(r.output.startswith("Order A-") for r in results[:20])
    assert all(r.output.startswith("Order G-") for r in results[20:])


async def test_a_tenant_connection_cannot_reach_another_tenants_subjects(corral_up):
    state_dir, _, _ = corral_up
    url = json.loads((state_dir / "corral.json").read_text())["nats_url"]
    key = load_secrets(state_dir).dev_key
    violations: list[str] = []
    seen = asyncio.Event()

    async def on_error(error):
        violations.append(str(error))
        seen.set()

    nc = await nats.connect(url, token=mint_dev_token("acme", key=key), inbox_prefix=b"_INBOX.acme", error_cb=on_error)
    try:
        await nc.publish("t.globex.router.request", b"{}")
        await asyncio.wait_for(seen.wait(), timeout=5)
        assert 'permissions violation for publish to "t.globex.router.request"' in violations[0].lower()
        seen.clear()
        await nc.subscribe("t.globex.>")
        await asyncio.wait_for(seen.wait(), timeout=5)
        assert 'subscription to "t.globex.>"' in violations[-1].lower()
    finally:
        await nc.close()


async def test_the_refund_walk_through_refunds_once_through_the_demo_payments_api(corral_up):
    state_dir, _, _ = corral_up
    info = json.loads((state_dir / "corral.json").read_text())
    key = load_secrets(state_dir).dev_key
    acme = await CorralClient.connect(info["nats_url"], tenant="acme", token=mint_dev_token("acme", key=key))
    try:
        run = await acme.request(target="refund", input={"order_id": "A-1001", "reason": "broken"})
    finally:
        await acme.close()
    assert run.output == {"notified": "A-1001", "message": "Your refund is on its way."}
    async with httpx.AsyncClient(base_url=info["payments_url"], timeout=10) as payments:
        refunds = (await payments.get("/v1/acme/refunds")).json()["refunds"]
        globex = (await payments.get("/v1/globex/refunds")).json()["refunds"]
    mine = [refund for refund in refunds if refund["idempotency_key"] == f"{run.run_id}:refund"]
    assert len(mine) == 1 and mine[0]["order_id"] == "A-1001" and mine[0]["amount"] == 40
    assert globex == []


def test_ctrl_c_stops_every_process_cleanly(tmp_path):
    _, process = start_corral_up(tmp_path)
    try:
        wait_for_file(tmp_path / "corral.json", process)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert not (tmp_path / "corral.json").exists()
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.log") if p.name != "nats.log"}
    assert set(logs) == {f"{name}-0.log" for name in NAMES} | {"payments-0.log"}  # the demo payments API
    assert all("service_stopped" in logs[f"{name}-0.log"] for name in NAMES), logs
    assert "payments_stopped" in logs["payments-0.log"]


def test_no_follow_prints_only_the_result(corral_up):
    _, env, _ = corral_up
    result = corral(env, "request", "--tenant", "acme", "--no-follow", "where is my order?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == ["Order A-1004 (Anvil, 50 kg) is shipped, expected 2026-11-27."]


def test_bench_reports_every_figure_as_json(tmp_path):
    env = {**os.environ, "CORRAL_STATE_DIR": str(tmp_path)}
    result = corral(env, "bench", "--requests", "60", "--concurrency", "8", "--rounds", "3", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in (
        "corral_rps",
        "raw_rps",
        "ratio",
        "corral_p50_ms",
        "corral_p99_ms",
        "graph_p50_ms",
        "langgraph_p50_ms",
        "corral_stream_rps",
    ):
        assert key in report
    assert report["corral_rps"] > 0 and report["raw_rps"] > 0
    assert len(report["round_ratios"]) == report["rounds"] == 3
    assert report["ratio"] == round(statistics.median(report["round_ratios"]), 3)
    assert report["event_loop"] == loop_name()  # what every process ran on (uvloop unless told otherwise)
    # The monitor's cost, measured in the same run: Corral with the monitor running and paused.
    assert len(report["monitor_round_ratios"]) == 3 and report["monitor_ratio"] > 0
    if report["langgraph_p50_ms"] is None:  # LangGraph is a benchmark-only extra
        assert report["graph_vs_langgraph"] is None and report["graph_round_ratios"] == []
    else:
        assert len(report["graph_round_ratios"]) == 3
        assert report["graph_vs_langgraph"] == round(statistics.median(report["graph_round_ratios"]), 3)


def test_corral_audit_lists_the_tenants_tool_calls_and_verifies_the_chain(corral_up):
    _, env, _ = corral_up
    assert corral(env, "request", "--tenant", "globex", "--no-follow", "where is my order?").returncode == 0
    deadline = time.monotonic() + 20
    while True:  # the audit trail is written asynchronously: poll it with a deadline
        result = corral(env, "audit", "--tenant", "globex", "--verify", "--json")
        report = json.loads(result.stdout)
        if any(r["action"] == "tool_call" for r in report["records"]) or time.monotonic() > deadline:
            break
    assert result.returncode == 0 and report["intact"] is True
    assert all(r["service"] in ("router", "graph", "tools", "operator") for r in report["records"])
    # corral up seeded globex into the tenant registry: the operator's chain says so
    assert [r["action"] for r in report["records"] if r["service"] == "operator"][:1] == ["tenant_seeded"]
    text = corral(env, "audit", "--tenant", "globex", "--verify")
    assert text.returncode == 0 and "chain intact" in text.stdout


def test_scaled_services_each_answer_and_requests_still_flow(tmp_path):
    env, process = start_corral_up(tmp_path, "--scale", "graph=2", "--scale", "tools=3")
    try:
        wait_for_file(tmp_path / "corral.json", process)  # ready means every replica answered its ping
        logs = sorted(p.name for p in (tmp_path / "logs").glob("*.log"))
        assert {"graph-0.log", "graph-1.log", "tools-0.log", "tools-1.log", "tools-2.log"} <= set(logs)
        for _ in range(5):
            result = corral(env, "request", "--tenant", "acme", "--no-follow", "where is my order?")
            assert result.returncode == 0 and result.stdout.startswith("Order A-")
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def test_corral_chat_holds_the_readmes_support_conversation(corral_up):
    _, env, _ = corral_up
    lines = "What are your opening hours?\nWhere is my order A-1002?\nI want a refund for A-1002\n\n"
    chat = subprocess.run(
        [*CORRAL, "chat", "--tenant", "acme", "--target", "support"],
        env=env,
        input=lines,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0, chat.stderr
    out = chat.stdout
    assert "support_triage> We are open Monday to Friday" in out
    assert "[support_triage] hands off to support_orders: an order question" in out
    assert "[support_orders] calls orders_lookup" in out
    assert "support_orders> Order A-1002 (Giant magnet) is delayed at the depot" in out
    assert "support_billing> I have started refund" in out
    sessions = {line.split()[1].rstrip(",") for line in out.splitlines() if line.strip().startswith("(session")}
    assert len(sessions) == 1  # one conversation, three turns


def test_corral_route_explain_says_which_rule_chose_what(corral_up):
    _, env, _ = corral_up
    explained = corral(env, "route", "explain", "--tenant", "acme", "--target", "support", "--json")
    assert explained.returncode == 0, explained.stderr
    assert json.loads(explained.stdout)["pattern"] == "swarm"


def test_corral_tenant_onboards_changes_and_removes_a_customer_while_the_system_runs(corral_up, tmp_path):
    _, env, _ = corral_up
    seeded = json.loads(corral(env, "tenant", "list", "--json").stdout)
    assert {row["tenant"] for row in seeded} >= {"acme", "globex"}  # corral up seeded the registry
    assert all(row["origin"] == "file" for row in seeded)
    added = corral(env, "tenant", "add", "initech", "--like", "acme")
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("tenant initech added (revision ")
    served = corral(env, "request", "--tenant", "initech", "--no-follow", "where is my order?")
    assert served.returncode == 0, served.stderr  # no restart: the services follow the registry
    assert "A-" not in served.stdout  # acme's routes, never acme's data

    policy = tmp_path / "initech.yaml"
    policy.write_text("tenant: initech\nroutes: {order_status: {graph: order_status}}\ntools: [orders_lookup]\n")
    updated = corral(env, "tenant", "update", "--file", str(policy), "--json")
    assert json.loads(updated.stdout)["done"] == "updated", updated.stderr
    untargeted = corral(env, "request", "--tenant", "initech", "--no-follow", "--json", "where is my order?")
    assert json.loads(untargeted.stdout)["error"]["code"] == "invalid_request"  # no default route any more

    broken = tmp_path / "broken.yaml"
    broken.write_text("tenant: initech\nroutes: {x: {graph: no_such_graph}}\n")
    refused = corral(env, "tenant", "update", "--file", str(broken), "--json")
    assert refused.returncode != 0 and "unknown graph 'no_such_graph'" in refused.stdout

    shown = json.loads(corral(env, "tenant", "show", "initech", "--json").stdout)
    assert shown["origin"] == "operator" and shown["policy"]["default_route"] is None
    removed = corral(env, "tenant", "remove", "initech")
    assert removed.returncode == 0, removed.stderr
    gone = corral(env, "request", "--tenant", "initech", "--no-follow", "--json", "where is my order?")
    assert json.loads(gone.stdout)["error"]["code"] == "forbidden"
    audit = corral(env, "audit", "--tenant", "initech", "--json")
    actions = [r["action"] for r in json.loads(audit.stdout)["records"] if r["service"] == "operator"]
    assert actions == ["tenant_added", "tenant_updated", "tenant_removed"]
