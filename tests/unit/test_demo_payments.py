"""The demo payments provider: one refund per idempotency key, tenants kept apart, typed errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from corral.demo import DEFINITIONS
from corral.demo.payments import URL_VARIABLE, RefundLedger, serve_in_thread
from corral.nats_server import free_port
from services.runtime.catalog import load_catalog
from services.toolkit.context import ToolContext
from services.toolkit.http_adapter import HttpAdapter

REFUND = {"order_id": "A-1001", "amount": 40}


@pytest.fixture
def api():
    with serve_in_thread() as server, httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def post(client: httpx.Client, tenant: str, body: object, key: str | None = "run-1:refund") -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post(f"/v1/{tenant}/refunds", json=body, headers=headers)


def test_the_first_request_with_a_key_creates_a_refund(api):
    answer = post(api, "acme", REFUND)
    assert answer.status_code == 201
    refund = answer.json()
    assert refund["id"].startswith("re_")
    assert {k: refund[k] for k in ("order_id", "amount", "tenant", "status")} == {
        "order_id": "A-1001",
        "amount": 40,
        "tenant": "acme",
        "status": "succeeded",
    }
    assert "idempotent-replayed" not in answer.headers


def test_the_same_key_and_body_again_replays_the_same_refund_and_creates_no_other(api):
    first = post(api, "acme", REFUND).json()
    again = post(api, "acme", REFUND)
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first
    assert api.get("/v1/acme/refunds").json()["refunds"] == [first]


def test_the_same_key_with_another_body_is_a_conflict(api):
    post(api, "acme", REFUND)
    answer = post(api, "acme", {"order_id": "A-1001", "amount": 41})
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "idempotency_key_reused"
    assert len(api.get("/v1/acme/refunds").json()["refunds"]) == 1


def test_a_refund_without_an_idempotency_key_is_refused(api):
    answer = post(api, "acme", REFUND, key=None)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "idempotency_key_required"
    assert api.get("/v1/acme/refunds").json()["refunds"] == []


@pytest.mark.parametrize(
    "body",
    [{"order_id": "A-1001"}, {"order_id": "", "amount": 5}, {"order_id": "A-1", "amount": -5}, [1], REFUND | {"x": 1}],
    ids=["no-amount", "empty-order", "negative", "not-an-object", "extra-field"],
)
def test_a_malformed_refund_is_refused_with_a_typed_error(api, body):
    answer = post(api, "acme", body)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_request"


def test_a_refund_over_the_limit_is_refused_and_not_remembered(api):
    answer = post(api, "acme", {"order_id": "A-1", "amount": 5000})
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "amount_over_limit"
    assert api.get("/v1/acme/refunds").json()["refunds"] == []


def test_tenants_never_see_each_others_refunds_or_keys(api):
    acme = post(api, "acme", REFUND).json()
    globex = post(api, "globex", {"order_id": "G-2201", "amount": 120})  # the same key, another tenant
    assert globex.status_code == 201 and globex.json()["id"] != acme["id"]
    assert api.get("/v1/acme/refunds").json()["refunds"] == [acme]
    assert [r["order_id"] for r in api.get("/v1/globex/refunds").json()["refunds"]] == ["G-2201"]
    assert api.get("/v1/initech/refunds").json()["refunds"] == []


@pytest.mark.parametrize("path", ["/v1/ACME!/refunds", "/v1/acme/charges", "/v1/acme/refunds/x", "/"])
def test_an_unknown_path_or_tenant_is_not_found(api, path):
    answer = api.get(path)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"


def test_concurrent_tries_of_one_key_create_one_refund(api):
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: post(api, "acme", REFUND), range(16)))
    assert sorted(a.status_code for a in answers) == [200] * 15 + [201]
    assert len({a.json()["id"] for a in answers}) == 1


def test_a_ledger_with_a_state_file_keeps_its_refunds_and_keys(tmp_path):
    path = tmp_path / "payments.json"
    first, _ = RefundLedger(path).refund("acme", "k", dict(REFUND))
    again, replayed = RefundLedger(path).refund("acme", "k", dict(REFUND))
    assert replayed and again == first
    assert RefundLedger(path).refunds("acme") == [first]


async def test_the_demo_refund_tool_posts_to_the_api_under_the_runtimes_tenant_with_the_calls_key(monkeypatch):
    monkeypatch.setenv(URL_VARIABLE, "http://127.0.0.1:8790")
    tool = load_catalog(DEFINITIONS).tools["issue_refund"]
    assert tool.http is not None and tool.python is None and tool.http.method == "POST"
    ctx = ToolContext(tenant_id="globex", run_id="r1", principal=None, timeout_s=5, idempotency_key="r1:refund")
    async with httpx.AsyncClient() as client:
        url, body, headers = HttpAdapter(tool.name, tool.http, client).build(ctx, dict(REFUND))
    assert str(url) == "http://127.0.0.1:8790/v1/globex/refunds"
    assert body == REFUND and headers["Idempotency-Key"] == "r1:refund"


# ---- as a process --------------------------------------------------------------------------


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 30) -> str:
    """The first line of the process's output holding ``text`` (read as it comes, with a deadline)."""
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    for line in process.stdout:
        if text in line:
            return line
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s"
    raise AssertionError(f"the process exited ({process.wait()}) without printing {text!r}")


def start(port: int, state: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "corral.demo.payments", "--port", str(port), "--state", str(state)],
        env={**os.environ, "CORRAL_LOG_LEVEL": "info", "CORRAL_LOG_FORMAT": "json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_the_process_says_when_it_is_ready_stops_cleanly_and_keeps_its_state(tmp_path, sig):
    port, state = free_port(), tmp_path / "payments.json"
    url = f"http://127.0.0.1:{port}"
    process = start(port, state)
    try:
        assert url in wait_for_line(process, "payments_ready")
        with httpx.Client(base_url=url) as client:
            created = post(client, "acme", REFUND).json()
        process.send_signal(sig)
        assert process.wait(timeout=30) == 0
        process = start(port, state)
        wait_for_line(process, "payments_ready")
        with httpx.Client(base_url=url) as client:
            assert post(client, "acme", REFUND).json() == created  # the key is still known
        process.terminate()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
