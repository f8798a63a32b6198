"""structlog, configured once per process: JSON in production, readable in a terminal.

``CORRAL_LOG_FORMAT``: ``auto`` (the default) writes the console format when standard error is a
terminal and JSON lines otherwise (log files, containers, pipes); ``console`` and ``json`` force
one. Every line names the process: ``service`` (``graph``) and ``replica`` (``graph-2``: the
replica index ``corral up`` gives as ``CORRAL_REPLICA``, else the pid).

The console format is made to fit a terminal: a short local time, the replica, the event, then
the fields, their values cut so that the line fits the terminal's width (each to at most
:data:`CONSOLE_VALUE_CHARS` characters). JSON lines carry every value whole.

:class:`RunLog` writes the one line per finished run (``run_finished``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog
from pydantic_core import to_json

CONSOLE_VALUE_CHARS = 60  # a console field's value is cut to this many characters
CONSOLE_VALUE_MIN = 12  # ... or fewer, down to this, for the line to fit the terminal
CONSOLE_WIDTH = 160  # the width a console line fits where the terminal's is unknown
_NOT_FIELDS = frozenset({"event", "timestamp", "level", "logger", "exc_info", "exception", "stack_info"})
CONSOLE_EVENT_WIDTH = 20  # the event column is padded to this width
FORMATS = ("auto", "console", "json")
RUN_LINES = ("all", "failed", "off")  # CORRAL_LOG_RUNS
# Where this process's JSON lines go, once configured: RunLog writes its lines there directly.
_SINK: dict[str, Any] = {"json": None}


def replica_name(service: str, replica: str | int | None, pid: int, host: str | None = None) -> str:
    """``graph-2``: the service and its replica index, else its pid (a process not started by
    ``corral up``), else, for the first process of a container (pid 1, as under Docker), the
    container's host name (its id, as ``docker ps`` shows it)."""
    if replica not in (None, ""):
        return f"{service}-{replica}"
    return f"{service}-{host if pid == 1 and host else pid}"


def configure_logging(
    service: str,
    *,
    fmt: str = "auto",
    level: str = "info",
    replica: str | None = None,
    stream: TextIO | None = None,
    width: int | None = None,
) -> Any:
    """Configure structlog for this process and return a logger bound to ``service`` and ``replica``
    (``replica`` defaults to ``<service>-<pid>``). ``width``: the columns a console line fits
    (default: the terminal's)."""
    stream = stream or sys.stderr
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    console = fmt == "console" or (fmt not in ("json",) and _is_terminal(stream))
    processors: list[Any] = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level]
    if console:
        colors = _is_terminal(stream)
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors,
            pad_event_to=CONSOLE_EVENT_WIDTH,
            sort_keys=False,  # the fields in the order given
            pad_level=False,
        )
        # The replica as a column of its own, before the event (rendered as ``[graph-2]``).
        renderer.columns = _reorder(renderer.columns)
        fit = _fit_to(width or _terminal_width(stream))
        processors += [_short_time, _replica_column, fit, renderer]
        factory: Any = structlog.PrintLoggerFactory(file=stream)
    else:
        binary = getattr(stream, "buffer", None)  # bytes straight from the serialiser, where it can
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_json if binary is not None else _json_text),
        ]
        factory = (
            structlog.BytesLoggerFactory(file=binary) if binary is not None else structlog.PrintLoggerFactory(stream)
        )
    _SINK["json"] = None if console else binary
    structlog.configure(
        processors=processors,
        # Filtering happens before any processor runs, so debug calls on the hot path are cheap.
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    name = replica or replica_name(service, None, os.getpid(), socket.gethostname())
    return structlog.get_logger().bind(service=service, replica=name)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _reorder(columns: list[Any]) -> list[Any]:
    """structlog's console columns with ``logger`` (the replica) moved before the event."""
    keys = [column.key for column in columns]
    if "logger" not in keys or "event" not in keys:
        return columns
    logger = columns[keys.index("logger")]
    ordered = [column for column in columns if column.key != "logger"]
    event = [column.key for column in ordered].index("event")
    return [*ordered[:event], logger, *ordered[event:]]


def _json(event: dict[str, Any], **_: Any) -> bytes:
    # pydantic-core's serialiser (a dependency already): about a third of json.dumps's time here;
    # a value it cannot serialise is written as its str().
    return to_json(event, serialize_unknown=True)


def _json_text(event: dict[str, Any], **_: Any) -> str:
    return _json(event).decode()


def _short_time(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    event["timestamp"] = datetime.fromtimestamp(now).strftime("%H:%M:%S.%f")[:-3]
    return event


def _replica_column(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """In the console the replica (``graph-2``) says which service too: one column for both."""
    replica = event.pop("replica", None)
    if replica is not None:
        event.pop("service", None)
        event["logger"] = replica
    return event


def _fit_to(width: int) -> Any:
    """A processor that cuts the fields' values so the line fits ``width`` columns: each to at
    most :data:`CONSOLE_VALUE_CHARS`, the longest ones further while the line is too long (to
    :data:`CONSOLE_VALUE_MIN` at the least: a line of very many fields may still wrap)."""

    def fit(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        texts = {
            key: value if isinstance(value, str) else repr(value)
            for key, value in event.items()
            if key not in _NOT_FIELDS
        }
        # time, level, [replica], the padded event: what comes before the fields.
        before = 12 + 1 + len(str(event.get("level", ""))) + 3 + len(str(event.get("logger", ""))) + 3
        before += max(len(str(event.get("event", ""))), CONSOLE_EVENT_WIDTH) + 1
        budget = width - before
        cap = CONSOLE_VALUE_CHARS
        while cap > CONSOLE_VALUE_MIN and sum(len(k) + 2 + min(len(t), cap) for k, t in texts.items()) > budget:
            cap -= 2
        for key, text in texts.items():
            if len(text) > cap:
                event[key] = _Cut(text[: cap - 1] + "…")
        return event

    return fit


def _terminal_width(stream: Any) -> int:
    try:
        return max(80, os.get_terminal_size(stream.fileno()).columns)
    except (AttributeError, OSError, ValueError):
        return int(os.environ.get("COLUMNS", "") or CONSOLE_WIDTH)


class _Cut(str):
    """A value already cut to size: the console prints it as it is, without quotes."""

    def __repr__(self) -> str:
        return str(self)


def run_targets(catalog: Any, pattern: str, tenants: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
    """For a run's log line: tenant -> the graph (or workflow) a route of ``pattern`` runs -> the
    name of the tenant's route that runs it (several, comma-separated, if several routes do).
    ``tenants``: only those (the ones a registry change touched; a removed one maps to nothing)."""
    found: dict[str, dict[str, str]] = {}
    chosen = catalog.tenants.items() if tenants is None else ((t, catalog.tenants.get(t)) for t in tenants)
    for tenant, policy in chosen:
        if policy is None:
            found[tenant] = {}
            continue
        names: dict[str, list[str]] = {}
        for name, route in sorted(policy.routes.items()):
            if route.pattern.value == pattern:
                names.setdefault(route.runs, []).append(name)
        found[tenant] = {runs: ",".join(routes) for runs, routes in names.items()}
    return found


class RunLog:
    """The one line per finished run: ``run_finished`` at info, with the tenant, the target (the
    tenant's route), the pattern, the outcome (``ok`` or the error code), the duration and the
    run. ``CORRAL_LOG_RUNS``: ``all`` (the default), ``failed`` (only runs that did not end
    ``ok``) or ``off``.

    It is on every run's path, so it is kept cheap: whether a run is logged is decided once, here
    (above info level, or off, a run costs one test and builds nothing), and in the JSON format the
    line is written directly, the same JSON a structlog line would be, at about half of
    structlog's cost (measured in docs/operations.md)."""

    __slots__ = ("_failed", "_log", "_ok", "_prefix", "_sink")

    def __init__(
        self, log: Any, mode: str = "all", level: str = "info", *, service: str = "", replica: str = ""
    ) -> None:
        numeric = logging.getLevelName(level.upper())
        shown = not isinstance(numeric, int) or numeric <= logging.INFO
        self._log = log
        self._failed = shown and mode in ("all", "failed")
        self._ok = shown and mode == "all"
        # In the JSON format, the binary stream configure_logging writes to (else through structlog).
        self._sink = _SINK["json"] if service else None
        self._prefix = to_json({"service": service, "replica": replica})[:-1] + b","

    def wanted(self, ok: bool) -> bool:
        """Whether a run ending so is logged (callers test it before measuring anything)."""
        return self._ok if ok else self._failed

    def finished(
        self,
        tenant: str,
        run_id: str | None,
        pattern: str,
        target: str | None,
        outcome: str,
        duration_ms: float,
        runs: str | None = None,
    ) -> None:
        """Log one finished run (``runs``: the graph or workflow it ran, shown when it is not
        the target's own name)."""
        if not (self._ok if outcome == "ok" else self._failed):
            return
        fields: dict[str, Any] = {
            "tenant_id": tenant,
            "target": target,
            "pattern": pattern,
            "outcome": outcome,
            "duration_ms": round(duration_ms, 2),
            "run_id": run_id,
        }
        if runs is not None and runs != target:
            fields["runs"] = runs
        sink = self._sink
        if sink is None:
            self._log.info("run_finished", **fields)
            return
        fields["event"] = "run_finished"
        fields["level"] = "info"
        fields["timestamp"] = _iso_now()
        try:
            sink.write(self._prefix + to_json(fields)[1:] + b"\n")
            sink.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not fail the run
            pass


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _iso_now() -> str:
    """Now as structlog's ISO UTC timestamp (``2026-12-01T23:01:21.235840Z``), formatting the
    date and time once per second."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[0], _second[1] = second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second[1]}.{int((now - second) * 1_000_000):06d}Z"
