"""The graph executor's declaration: runs in, tool calls and progress events out."""

from contracts import subjects
from contracts.envelope import GraphRun, Kind, RunEvent
from services.runtime.manifest import Consume, Manifest, Publishes

MANIFEST = Manifest(
    name="graph",
    summary="Runs declared graphs: explicit nodes and transitions, parallel branches, limits",
    consumes=(Consume("run", subjects.GRAPH_RUNS, Kind.GRAPH_RUN, GraphRun, "Run a declared graph for the tenant"),),
    publishes=(
        Publishes(
            subjects.ALL_EVENTS,
            "Progress of one run (accepted, started, node, completed, failed); a tenant may subscribe",
            RunEvent,
            address="t.{tenant}.events.{principal}.{run_id}",
        ),
    ),
    requests=(subjects.TOOL_CALLS,),
)
