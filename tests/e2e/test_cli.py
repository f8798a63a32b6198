"""The corral command says what happened, never hangs and never prints a traceback; the logs of a
running system can be read (one line per finished run, every line naming its replica); `corral
ping` answers for each service. Against a real `corral up` (two graph replicas) in subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from contracts.errors import TenantMismatch
from corral.client import CorralClient
from corral.nats_server import free_port
from services.auth.tokens import mint_dev_token
from services.registry import NAMES
from services.runtime.credentials import load_secrets
from tests.e2e.test_corral_up import stop_corral_up

CORRAL = [sys.executable, "-m", "corral.cli"]
# Starting the interpreter and importing the CLI, on two busy cores: what a command may take on
# top of its own timeout.
STARTUP_S = 8.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_STATE_DIR", "CORRAL_NATS_URL", "CORRAL_DEBUG")}
    return {**env, **extra}


def corral(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 60):
    started = time.monotonic()
    done = subprocess.run([*CORRAL, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def assert_one_clean_error_line(done: subprocess.CompletedProcess, code: str) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {code}: "), done.stderr
    return lines[0]


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """`corral up --scale graph=2` on a free port; yields (state dir, env, the logs at start-up)."""
    state_dir = tmp_path_factory.mktemp("state")
    env = clean_env(CORRAL_STATE_DIR=str(state_dir))
    process = subprocess.Popen(
        [*CORRAL, "up", "--port", str(free_port()), "--log-dir", str(state_dir / "logs"), "--scale", "graph=2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (state_dir / "corral.json").exists():
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "corral up did not become ready"
            time.sleep(0.05)  # polling a file with a deadline
        first, _ = corral("request", "--tenant", "acme", "--no-follow", "where is my order?", env=env)
        assert first.returncode == 0, first.stderr
        startup = {path.name: path.read_text() for path in (state_dir / "logs").glob("*.log")}
        yield state_dir, env, startup
    finally:
        stop_corral_up(process)


# ---- the broker permissions of a fresh system ----------------------------------------------


def test_a_fresh_corral_up_and_a_first_request_log_no_permissions_violation(system):
    _, _, startup = system
    assert "nats.log" in startup and {f"{name}-0.log" for name in NAMES} <= set(startup)
    for name, text in startup.items():
        assert "Violation" not in text, (name, [line for line in text.splitlines() if "Violation" in line])
        assert "nats_error" not in text and "permissions" not in text.lower(), name


# ---- never hangs ---------------------------------------------------------------------------


def test_a_request_to_a_dead_broker_url_fails_within_its_timeout(system):
    _, env, _ = system
    dead = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    done, took = corral("request", "--tenant", "acme", "--nats-url", dead, "--timeout", "2", "hi", env=env)
    line = assert_one_clean_error_line(done, "unavailable")
    assert f"cannot reach the broker at {dead} (from --nats-url)" in line
    assert took < 2 + STARTUP_S


def test_a_stale_state_file_fails_within_the_timeout_and_says_where_the_url_came_from(system, tmp_path):
    state_dir, _, _ = system
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copy(state_dir / "secrets.json", stale / "secrets.json")
    dead = f"nats://127.0.0.1:{free_port()}"
    (stale / "corral.json").write_text(json.dumps({"nats_url": dead, "pid": 1}))
    done, took = corral(
        "request", "--tenant", "acme", "--timeout", "2", "--json", "hi", env=clean_env(CORRAL_STATE_DIR=str(stale))
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "unavailable" and str(stale / "corral.json") in error["message"]
    assert took < 2 + STARTUP_S


# ---- tokens --------------------------------------------------------------------------------


def test_a_token_of_another_tenant_fails_at_once_with_a_clear_message(system):
    _, env, _ = system
    acme = corral("token", "--tenant", "acme", env=env)[0].stdout.strip()
    done, took = corral("request", "--token", acme, "--tenant", "globex", "hi", env=env)  # --timeout is 30 s
    line = assert_one_clean_error_line(done, "tenant_mismatch")
    assert "the token is for tenant 'acme', not 'globex'" in line
    assert took < STARTUP_S


async def test_the_client_refuses_at_connect_a_token_that_may_not_read_the_tenants_inbox(system):
    state_dir, _, _ = system
    url = json.loads((state_dir / "corral.json").read_text())["nats_url"]
    token = mint_dev_token("acme", key=load_secrets(state_dir).dev_key)
    started = time.monotonic()
    with pytest.raises(TenantMismatch, match="may not act as tenant 'globex'"):
        await CorralClient.connect(url, tenant="globex", token=token)
    assert time.monotonic() - started < 5


def test_a_token_that_is_not_a_jwt_is_refused_in_one_line(system):
    _, env, _ = system
    done, _ = corral("request", "--token", "garbage", "hi", env=env)
    line = assert_one_clean_error_line(done, "unauthorized")
    assert "--token is not a JWT" in line


def test_a_token_the_broker_refuses_is_reported_as_unauthorized(system):
    _, env, _ = system
    acme = corral("token", "--tenant", "acme", env=env)[0].stdout.strip()
    done, _ = corral("request", "--token", acme[:-4] + "AAAA", "hi", env=env)  # its signature broken
    assert "refused the token" in assert_one_clean_error_line(done, "unauthorized")


# ---- the state directory -------------------------------------------------------------------


@pytest.mark.parametrize("command", [["token", "--tenant", "acme"], ["request", "--tenant", "acme", "hi"]])
def test_a_command_run_from_another_folder_says_where_it_looked_for_the_state(tmp_path, command):
    done, _ = corral(*command, env=clean_env(), cwd=tmp_path)
    line = assert_one_clean_error_line(done, "not_found")
    assert f"no Corral state directory at {tmp_path.resolve() / '.corral'} (in the current folder)" in line
    assert "corral up" in line and "--state-dir" in line


def test_a_missing_state_directory_is_one_json_error_with_a_code(tmp_path):
    done, _ = corral("request", "--tenant", "acme", "--json", "hi", env=clean_env(), cwd=tmp_path)
    assert done.returncode == 1 and done.stderr == ""
    error = json.loads(done.stdout)
    assert error["ok"] is False and error["error"]["code"] == "not_found"
    assert error["error"]["message"].startswith("no Corral state directory at")


def test_the_same_state_directory_is_found_from_state_dir_and_from_the_environment(system, tmp_path):
    state_dir, _, _ = system
    by_flag, _ = corral("token", "--tenant", "acme", "--state-dir", str(state_dir), env=clean_env(), cwd=tmp_path)
    by_env, _ = corral("token", "--tenant", "acme", env=clean_env(CORRAL_STATE_DIR=str(state_dir)), cwd=tmp_path)
    assert by_flag.returncode == by_env.returncode == 0
    key = load_secrets(state_dir).dev_key
    for done in (by_flag, by_env):
        assert jwt.decode(done.stdout.strip(), key, algorithms=["HS256"], options={"verify_aud": False})


# ---- output --------------------------------------------------------------------------------


def test_audit_json_into_a_closed_pipe_stops_quietly(system):
    _, env, _ = system
    process = subprocess.Popen(
        [*CORRAL, "audit", "--tenant", "acme", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # the reader is gone before anything is written, as `| head` leaves it
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 141, errors
    assert errors == b""


def test_version():
    done, _ = corral("--version", env=clean_env())
    assert done.returncode == 0 and done.stdout.startswith("corral ") and done.stderr == ""


# ---- corral ping ---------------------------------------------------------------------------


def test_ping_lists_every_replica_of_a_service_by_name(system):
    _, env, _ = system
    done, _ = corral("ping", "graph", "--json", env=env)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert [replica["name"] for replica in answer["replicas"]] == ["graph-0", "graph-1"]
    shown, _ = corral("ping", "graph", env=env)
    assert [line.split()[0] for line in shown.stdout.splitlines()] == ["graph-0", "graph-1"]


@pytest.mark.parametrize("service", NAMES)
def test_ping_answers_for_every_service_the_auth_service_included(system, service):
    _, env, _ = system
    done, _ = corral("ping", service, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == f"{service}-0"


def test_ping_fails_when_no_replica_answers(secured):
    env = clean_env(CORRAL_STATE_DIR=str(secured.state_dir))
    done, took = corral("ping", "router", "--nats-url", secured.url, "--timeout", "0.5", env=env)
    assert "no replica of router answered" in assert_one_clean_error_line(done, "unavailable")
    assert took < 0.5 + STARTUP_S


def test_ping_of_an_unknown_service_names_the_services(system):
    _, env, _ = system
    done, _ = corral("ping", "nope", env=env)
    assert "the services are" in assert_one_clean_error_line(done, "invalid_request")


# ---- logs ----------------------------------------------------------------------------------


def _wait_for_run_line(logs: Path, pattern: str, run_id: str) -> dict:
    deadline = time.monotonic() + 10
    while True:
        for path in logs.glob(f"{pattern}-*.log"):
            for line in log_lines(path):
                if line.get("event") == "run_finished" and line.get("run_id") == run_id:
                    return {**line, "file": path.name}
        assert time.monotonic() < deadline, f"no run_finished line for {run_id}"
        time.sleep(0.05)  # polling a log file with a deadline


def test_a_finished_graph_run_is_one_info_line_with_its_tenant_target_pattern_outcome_and_duration(system):
    state_dir, env, _ = system
    done, _ = corral("request", "--tenant", "globex", "--json", "where is my order?", env=env)
    run_id = json.loads(done.stdout)["run_id"]
    line = _wait_for_run_line(state_dir / "logs", "graph", run_id)
    assert line["level"] == "info" and line["service"] == "graph"
    assert (line["tenant_id"], line["target"], line["pattern"], line["outcome"]) == (
        "globex",
        "order_status",
        "graph",
        "ok",
    )
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0
    assert line["replica"] == line["file"].removesuffix(".log")  # graph-0 or graph-1


def test_a_finished_workflow_run_is_one_info_line_too(system):
    state_dir, env, _ = system
    done, _ = corral(
        "workflow",
        "start",
        "--tenant",
        "acme",
        "refund",
        "--input",
        '{"order_id": "A-1001", "reason": "x"}',
        "--json",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout)["result"]["run_id"]
    line = _wait_for_run_line(state_dir / "logs", "workflow", run_id)
    assert (line["tenant_id"], line["target"], line["pattern"], line["outcome"]) == ("acme", "refund", "workflow", "ok")


def test_every_line_of_every_service_log_names_its_service_and_replica(system):
    state_dir, _, _ = system
    for name in NAMES:
        for replica in (0, 1) if name == "graph" else (0,):
            lines = log_lines(state_dir / "logs" / f"{name}-{replica}.log")
            assert lines and all(line["service"] == name for line in lines), name
            assert {line["replica"] for line in lines} == {f"{name}-{replica}"}


async def test_init_writes_nodes_that_form_a_cluster_with_the_first_nodes_keys(tmp_path):
    """``corral init --cluster-node``: each machine's state directory, with the first one's
    secrets.json copied in, becomes one node; the nodes route to each other and share accounts."""
    import nats

    from corral.nats_server import NatsServer

    ports = {name: (free_port(), free_port()) for name in ("a", "b")}
    for name, (port, cluster_port) in ports.items():
        state = tmp_path / name
        if name == "b":
            state.mkdir()
            shutil.copy(tmp_path / "a" / "secrets.json", state / "secrets.json")  # the first node's keys
        other = next(p for n, p in ports.items() if n != name)
        done, _ = corral(
            *("init", "--state-dir", str(state), "--no-demo", "--port", str(port)),
            *("--cluster-node", name, "--cluster-port", str(cluster_port), "--routes", f"nats://127.0.0.1:{other[1]}"),
            env=clean_env(),
        )
        assert done.returncode == 0, done.stderr
        assert (state / "nats.conf").stat().st_mode & 0o077 == 0  # it holds the users' passwords
    secrets = load_secrets(tmp_path / "a")
    assert secrets.passwords == load_secrets(tmp_path / "b").passwords
    with (
        NatsServer(config=tmp_path / "a" / "nats.conf", port=ports["a"][0], log_file=tmp_path / "a.log") as first,
        NatsServer(config=tmp_path / "b" / "nats.conf", port=ports["b"][0], log_file=tmp_path / "b.log"),
    ):
        admin = await nats.connect(
            first.url, user="admin", password=secrets.passwords["admin"], inbox_prefix=b"_INBOX._admin"
        )
        try:
            deadline = time.monotonic() + 20
            # The route is up once b's address is known: from the first INFO, or from the one the
            # broker sends when the route forms (nats-py adds it to the pool, not to the first
            # INFO it keeps, so reading that missed a route that formed after the connect).
            while not any(server.port == ports["b"][0] for server in admin.discovered_servers):
                assert time.monotonic() < deadline, "the nodes did not form a cluster"
                await admin.flush()
                await asyncio.sleep(0.05)  # polling with a deadline
        finally:
            await admin.close()
