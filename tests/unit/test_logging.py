"""Logs a person can read: the console format fits a terminal, JSON carries everything, every
line names its replica, and one line per finished run (services/runtime/logging.py)."""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import pytest

from contracts.definitions import Route
from services.runtime.logging import CONSOLE_VALUE_CHARS, RunLog, configure_logging, replica_name, run_targets

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LONG_OPERATIONS = ["t.*.workflow.start", "t.*.workflow.signal.>", "t.*.workflow.query.*", "t.*.workflow.task.*"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class File(io.TextIOWrapper):
    """A log file: not a terminal, with a binary buffer underneath."""

    def __init__(self) -> None:
        self.raw_bytes = io.BytesIO()
        super().__init__(self.raw_bytes, encoding="utf-8", write_through=True)

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.raw_bytes.getvalue().decode().splitlines()]


def test_a_terminal_gets_the_console_format_and_a_file_gets_json_lines():
    terminal, file = Terminal(), File()
    configure_logging("graph", replica="graph-2", stream=terminal).info("service_ready", pid=7)
    configure_logging("graph", replica="graph-2", stream=file).info("service_ready", pid=7)
    assert "service_ready" in terminal.getvalue() and not terminal.getvalue().startswith("{")
    [line] = file.lines()
    assert line["event"] == "service_ready" and line["pid"] == 7 and line["level"] == "info"


def test_every_json_line_names_the_service_and_its_replica():
    file = File()
    log = configure_logging("graph", fmt="json", replica="graph-2", stream=file)
    log.info("service_ready")
    log.warning("nats_error", error="x")
    assert [(line["service"], line["replica"]) for line in file.lines()] == [("graph", "graph-2")] * 2


@pytest.mark.parametrize("width", [120, 160])
def test_a_console_line_names_the_replica_first_and_fits_the_terminal(width):
    terminal = Terminal()
    log = configure_logging("workflow", fmt="console", replica="workflow-0", stream=terminal, width=width)
    log.info("service_ready", operations=LONG_OPERATIONS, server="N" * 56, pid=14229)
    line = ANSI.sub("", terminal.getvalue().rstrip("\n"))
    assert len(line) <= width, line
    assert re.match(r"^\d\d:\d\d:\d\d\.\d{3} \[info\] \[workflow-0\] service_ready", line), line
    assert "service=" not in line  # the replica says which service
    assert "pid=14229" in line and "…" in line  # the long value is cut, the rest is kept


def test_console_values_longer_than_the_limit_are_cut_and_json_values_are_not():
    terminal, file = Terminal(), File()
    configure_logging("tools", fmt="console", replica="tools-0", stream=terminal, width=200).info("x", detail="y" * 500)
    configure_logging("tools", fmt="json", replica="tools-0", stream=file).info("x", detail="y" * 500)
    shown = re.search(r"detail=(\S+)", ANSI.sub("", terminal.getvalue())).group(1)
    assert len(shown) == CONSOLE_VALUE_CHARS and shown.endswith("…")
    assert file.lines()[0]["detail"] == "y" * 500


def test_a_replica_is_named_by_its_index_else_by_its_pid_else_by_its_container():
    assert replica_name("graph", "2", 812) == "graph-2"
    assert replica_name("graph", None, 812, "3f2a9c1b7d0e") == "graph-812"
    assert replica_name("graph", None, 1, "3f2a9c1b7d0e") == "graph-3f2a9c1b7d0e"  # a container's first process


def _run_lines(mode: str, level: str = "info") -> list[dict]:
    file = File()
    log = configure_logging("graph", fmt="json", level=level, replica="graph-1", stream=file)
    runs = RunLog(log, mode, level, service="graph", replica="graph-1")
    runs.finished("acme", "r1", "graph", "order_status", "ok", 2.345, "order_status")
    runs.finished("acme", "r2", "graph", "order_status", "tool_failed", 10.0, "order_status")
    return file.lines()


def test_a_finished_run_is_one_info_line_with_tenant_target_pattern_outcome_duration_and_run():
    ok, failed = _run_lines("all")
    assert ok == {
        "service": "graph",
        "replica": "graph-1",
        "tenant_id": "acme",
        "target": "order_status",
        "pattern": "graph",
        "outcome": "ok",
        "duration_ms": 2.35,
        "run_id": "r1",
        "event": "run_finished",
        "level": "info",
        "timestamp": ok["timestamp"],
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ok["timestamp"])
    assert failed["outcome"] == "tool_failed" and failed["run_id"] == "r2"


@pytest.mark.parametrize(
    ("mode", "level", "outcomes"),
    [
        ("all", "info", ["ok", "tool_failed"]),
        ("failed", "info", ["tool_failed"]),
        ("off", "info", []),
        ("all", "warning", []),
    ],
)
def test_run_lines_follow_corral_log_runs_and_the_level(mode, level, outcomes):
    assert [line["outcome"] for line in _run_lines(mode, level)] == outcomes


def test_a_run_line_in_the_console_goes_through_the_console_format():
    terminal = Terminal()
    log = configure_logging("graph", fmt="console", replica="graph-1", stream=terminal, width=200)
    RunLog(log, "all", "info", service="graph", replica="graph-1").finished(
        "acme", "r1", "graph", "support", "ok", 1.0, "support_triage"
    )
    line = ANSI.sub("", terminal.getvalue())
    assert "[graph-1] run_finished" in line
    assert (
        "tenant_id=acme target=support pattern=graph outcome=ok duration_ms=1.0 run_id=r1 runs=support_triage" in line
    )


def test_the_target_of_a_run_is_the_tenants_route_that_runs_it():
    routes = {
        "acme": {"ask": Route(graph="g"), "again": Route(graph="g"), "refund": Route(pattern="workflow", workflow="r")},
        "globex": {"status": Route(graph="g")},
    }
    catalog = SimpleNamespace(tenants={tenant: SimpleNamespace(routes=found) for tenant, found in routes.items()})
    assert run_targets(catalog, "graph") == {"acme": {"g": "again,ask"}, "globex": {"g": "status"}}
    assert run_targets(catalog, "workflow") == {"acme": {"r": "refund"}, "globex": {}}
