"""Which executor serves each pattern: its service, the subject of a run, and the run's payload.

Adding a pattern is one row here; the router's manifest takes the subjects it passes runs to and
the services it watches from this table (so its broker permissions follow), and the handler
looks a route's pattern up in it. Pure: imports ``contracts`` only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_json

from contracts import subjects
from contracts.definitions import Pattern, Route
from contracts.envelope import Kind


@dataclass(frozen=True)
class Executor:
    service: str  # the executor service, watched by the router (services/runtime/liveness.py)
    runs: str  # the subscription pattern of its runs (``t.*.graph.run``)
    subject: Callable[[str], str]  # a tenant's run subject
    kind: Kind
    # The run's payload as JSON, from the route, the request's input and whether the client watches.
    payload: Callable[[Route, dict[str, Any], bool], bytes]


def _graph_run(route: Route, input: dict[str, Any], stream: bool) -> bytes:
    # The input was validated with the request and the graph name with the definitions: the
    # payload is written directly.
    return to_json({"graph": route.graph, "input": input, "stream": stream})


def _workflow_start(route: Route, input: dict[str, Any], stream: bool) -> bytes:
    # The route's params are not sent: the workflow engine reads them from the tenant's route itself.
    return to_json({"workflow": route.workflow, "input": input, "stream": stream})


EXECUTORS: dict[Pattern, Executor] = {
    Pattern.GRAPH: Executor("graph", subjects.GRAPH_RUNS, subjects.graph_run, Kind.GRAPH_RUN, _graph_run),
    Pattern.WORKFLOW: Executor(
        "workflow", subjects.WORKFLOW_STARTS, subjects.workflow_start, Kind.WORKFLOW_START, _workflow_start
    ),
}
