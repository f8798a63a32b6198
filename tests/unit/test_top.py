"""`corral top`: the monitor's figures as a table, busiest tenant first, trouble in red; one
tenant's subject families; one clear error line when the monitor cannot be read. The render
functions against fixed API answers; the command against a stub of the monitor's HTTP API."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from rich.console import Console
from rich.table import Table
from rich.text import Text

from contracts.errors import Unauthorized, Unavailable
from corral.cli import main
from corral.nats_server import free_port
from corral.state import init_state, write_runtime_info
from corral.top import ALERT, subjects_table, tenant_view, tenants_table, watch
from tests.support.http import Reply, http_server
from tests.support.monitor_api import OPERATOR_TOKEN, FakeMonitor

ROW = {"messages": 600, "refusals": 0, "p50_ms": 3.25, "p99_ms": 12.0, "in_flight": 1, "connections": 2}
TENANTS = {
    "window_s": 60,
    "updated_at": 1_760_000_000,
    "tenants": [
        {**ROW, "tenant": "acme", "rate": 10.0, "errors": 0, "denials": 0},
        {**ROW, "tenant": "globex", "rate": 120.5, "errors": 4, "denials": 0},
        {**ROW, "tenant": "initech", "rate": 0.5, "errors": 0, "denials": 2, "p50_ms": None, "connections": None},
    ],
}
DETAIL = {
    "tenant": "acme",
    "window_s": 60,
    "updated_at": 1_760_000_000,
    "series": {},
    "totals": {**ROW, "tenant": "acme", "rate": 10.0, "errors": 3, "denials": 0},
    "subjects": [
        {"family": "t.acme.tools.call", "service": "tools", "operation": "call", "rate": 2.0, "messages": 120,
         "errors": 3, "p50_ms": 8.0, "p99_ms": 30.0},
        {"family": "t.acme.router.request", "service": "router", "operation": "request", "rate": 10.0,
         "messages": 600, "errors": 0, "p50_ms": 3.0, "p99_ms": 11.0},
    ],
}  # fmt: skip


def column(table: Table, header: str) -> list:
    return next(list(c._cells) for c in table.columns if c.header == header)


def text_of(renderable) -> str:
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


@pytest.fixture
def wide(monkeypatch):
    """A wide terminal for the command's own console, so no column is squeezed."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("CORRAL_MONITOR_URL", raising=False)
    monkeypatch.delenv("CORRAL_STATE_DIR", raising=False)


# ---- rendering ----------------------------------------------------------------------------


def test_tenants_are_listed_busiest_first():
    assert column(tenants_table(TENANTS), "tenant") == ["globex", "acme", "initech"]


def test_errors_and_denials_are_red_only_when_not_zero():
    table = tenants_table(TENANTS)
    errors, denials = column(table, "errors"), column(table, "denials")
    assert [str(cell) for cell in errors] == ["4", "0", "0"]
    assert [cell.style for cell in errors] == [ALERT, "", ""]
    assert [cell.style for cell in denials] == ["", "", ALERT]


def test_a_figure_the_monitor_does_not_have_is_a_dash():
    table = tenants_table(TENANTS)
    assert column(table, "p50 ms")[2] == "-" and column(table, "conns")[2] == "-"
    assert column(table, "p99 ms")[2] == "12.0"


def test_the_table_says_when_there_is_no_traffic():
    assert "no traffic in the window" in text_of(tenants_table({"window_s": 60, "tenants": []}))


def test_the_tenant_view_shows_its_totals_and_its_subject_families_busiest_first():
    shown = text_of(tenant_view(DETAIL))
    assert "tenant acme" in shown and "10.0 msg/s" in shown
    assert shown.index("t.acme.router.request") < shown.index("t.acme.tools.call")
    errors = column(subjects_table(DETAIL["subjects"]), "errors")
    assert [(str(cell), cell.style) for cell in errors] == [("0", ""), ("3", ALERT)]


def test_the_tenant_views_error_count_is_red():
    line = tenant_view(DETAIL).renderables[0]
    assert isinstance(line, Text)
    assert any(span.style == ALERT and line.plain[span.start : span.end] == "3" for span in line.spans)


# ---- the command against a stub monitor ----------------------------------------------------


def test_once_prints_the_tenants_table_and_exits(wide, capsys):
    fake = FakeMonitor()
    with http_server(fake) as server:
        status = main(["top", "--monitor-url", server.url, "--token", OPERATOR_TOKEN, "--once"])
    out = capsys.readouterr().out
    assert status == 0
    assert [line.split()[1] for line in out.splitlines() if line.startswith("│ ") and "tenant" not in line] == [
        row["tenant"] for row in fake.tenants(1)["tenants"]
    ]
    assert fake.calls == ["/api/tenants"]


def test_once_with_a_tenant_shows_its_subject_families(wide, capsys):
    fake = FakeMonitor()
    with http_server(fake) as server:
        status = main(["top", "--monitor-url", server.url, "--token", OPERATOR_TOKEN, "--tenant", "acme", "--once"])
    out = capsys.readouterr().out
    assert status == 0
    assert "tenant acme" in out
    assert all(f"t.acme.{family}" in out for family in ("router.request", "graph.run", "tools.call"))
    assert fake.calls == ["/api/tenants/acme", "/api/subjects"]


def test_json_prints_the_monitors_answer(wide, capsys):
    with http_server(FakeMonitor()) as server:
        status = main(["top", "--monitor-url", server.url, "--token", OPERATOR_TOKEN, "--json", "--limit", "2"])
    answer = json.loads(capsys.readouterr().out)
    assert status == 0
    assert answer["window_s"] == 60 and len(answer["tenants"]) == 2


def test_the_url_and_the_operator_token_come_from_the_state_directory(wide, tmp_path, capsys):
    token = init_state(tmp_path, demo=False).monitor_operator_token
    with http_server(FakeMonitor(token=token)) as server:
        write_runtime_info(tmp_path, {"monitor_url": server.url})
        status = main(["top", "--state-dir", str(tmp_path), "--once"])
    assert status == 0
    assert "globex" in capsys.readouterr().out


def test_a_refused_token_is_one_line_with_the_monitors_message(wide, capsys):
    with http_server(FakeMonitor()) as server:
        status = main(["top", "--monitor-url", server.url, "--token", "stale", "--once"])
    captured = capsys.readouterr()
    assert status == 1
    assert captured.err.splitlines() == [
        "error: unauthorized: the monitor answered 401 for /api/tenants: the token is not valid here (expired, or"
        " signed by another key)"
    ]


def test_an_unknown_tenant_is_not_found(wide, capsys):
    with http_server(FakeMonitor()) as server:
        status = main(["top", "--monitor-url", server.url, "--token", OPERATOR_TOKEN, "--tenant", "nobody", "--once"])
    assert status == 1
    assert capsys.readouterr().err.startswith("error: not_found: ")


def test_an_unreachable_monitor_is_one_line(wide, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    status = main(["top", "--monitor-url", url, "--token", OPERATOR_TOKEN, "--once"])
    err = capsys.readouterr().err
    assert status == 1
    assert len(err.splitlines()) == 1 and err.startswith(f"error: unavailable: cannot reach the monitor at {url}")


def test_a_monitor_that_does_not_answer_gives_up_within_the_timeout(wide, capsys):
    stuck = threading.Event()
    with http_server(lambda request: Reply(wait=stuck)) as server:
        started = time.monotonic()
        status = main(["top", "--monitor-url", server.url, "--token", OPERATOR_TOKEN, "--once", "--timeout", "0.5"])
        elapsed = time.monotonic() - started
        err = capsys.readouterr().err  # before the stub, released, writes to the closed socket
        stuck.set()
    assert status == 1 and elapsed < 5
    assert err.splitlines() == [f"error: unavailable: the monitor at {server.url} did not answer in time"]


def test_without_a_url_it_says_where_it_looked(wide, tmp_path, capsys):
    init_state(tmp_path, demo=False)
    status = main(["top", "--state-dir", str(tmp_path), "--token", OPERATOR_TOKEN, "--once"])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("error: not_found: no running monitor found in ")
    assert "--monitor-url" in err


def test_without_a_token_it_says_how_to_give_one(wide, tmp_path, capsys):
    init_state(tmp_path, demo=False)
    secrets = json.loads((tmp_path / "secrets.json").read_text())
    del secrets["monitor_operator_token"]  # a state directory from before the monitor
    (tmp_path / "secrets.json").write_text(json.dumps(secrets))
    status = main(["top", "--state-dir", str(tmp_path), "--monitor-url", "http://127.0.0.1:9", "--once"])
    err = capsys.readouterr().err
    assert status == 1 and "monitor_operator_token" in err and "--token" in err


def test_an_invalid_tenant_is_refused_before_any_request(wide, capsys):
    status = main(["top", "--monitor-url", "http://127.0.0.1:9", "--token", "t", "--tenant", "../x", "--once"])
    assert status == 1 and "invalid tenant id" in capsys.readouterr().err


# ---- the live loop ------------------------------------------------------------------------


def scripted(*outcomes):
    """A load function giving each outcome in turn: an answer, or an exception to raise."""
    queue = list(outcomes)

    def load():
        outcome = queue.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return load


def test_the_live_table_shows_a_monitor_gone_away_in_place_and_ctrl_c_ends_it():
    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    load = scripted(TENANTS, Unavailable("cannot reach the monitor at http://x"), TENANTS, KeyboardInterrupt())
    assert watch(load, tenants_table, interval=0, console=console) == 0
    assert "cannot reach the monitor at http://x; trying again" in console.file.getvalue()


def test_a_token_refused_while_watching_ends_the_live_table():
    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    with pytest.raises(Unauthorized):
        watch(scripted(TENANTS, Unauthorized("expired")), tenants_table, interval=0, console=console)
