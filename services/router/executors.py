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
from contracts.envelope import Kind, RouterRequest
from contracts.errors import InvalidRequest


@dataclass(frozen=True)
class Executor:
    service: str  # the executor service, watched by the router (services/runtime/liveness.py)
    runs: str  # the subscription pattern of its runs (``t.*.graph.run``)
    subject: Callable[[str], str]  # a tenant's run subject
    kind: Kind
    # The run's payload as JSON, from the route, the request and whether the client watches.
    payload: Callable[[Route, RouterRequest, bool], bytes]


def _graph_run(route: Route, request: RouterRequest, stream: bool) -> bytes:
    # The input was validated with the request and the graph name with the definitions: the
    # payload is written directly.
    return to_json({"graph": route.graph, "input": request.input, "stream": stream})


def _workflow_start(route: Route, request: RouterRequest, stream: bool) -> bytes:
    # The route's params are not sent: the workflow engine reads them from the tenant's route itself.
    return to_json({"workflow": route.workflow, "input": request.input, "stream": stream})


def _swarm_turn(route: Route, request: RouterRequest, stream: bool) -> bytes:
    """A turn of a conversation: the request's ``text`` is the user's message."""
    message = request.input.get("text")
    if not isinstance(message, str) or not message:
        raise InvalidRequest(f"a conversation's turn needs a text (input.text) for {route.pattern.value} routes")
    target: dict[str, Any] = {"swarm": route.swarm} if route.pattern is Pattern.SWARM else {"agent": route.agent}
    return to_json({**target, "message": message, "session": request.session, "stream": stream})


EXECUTORS: dict[Pattern, Executor] = {
    Pattern.GRAPH: Executor("graph", subjects.GRAPH_RUNS, subjects.graph_run, Kind.GRAPH_RUN, _graph_run),
    Pattern.WORKFLOW: Executor(
        "workflow", subjects.WORKFLOW_STARTS, subjects.workflow_start, Kind.WORKFLOW_START, _workflow_start
    ),
    Pattern.SWARM: Executor("swarm", subjects.SWARM_TURNS, subjects.swarm_turn, Kind.SWARM_TURN, _swarm_turn),
    Pattern.ORCHESTRATOR: Executor("swarm", subjects.SWARM_TURNS, subjects.swarm_turn, Kind.SWARM_TURN, _swarm_turn),
}
# Each executor service once (two patterns share the swarm service).
SERVED = {executor.service: executor.runs for executor in EXECUTORS.values()}
