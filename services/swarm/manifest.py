"""The swarm service's declaration: conversation turns in (from the router, and from itself for
agents called as tools); tool calls, graph runs, workflow starts, turns and events out; its
sessions bucket."""

from contracts import subjects
from contracts.envelope import Kind, RunEvent, SwarmTurn
from services.runtime.census import watch_api
from services.runtime.manifest import Consume, Manifest, Publishes, kv_api
from services.swarm.sessions import BUCKET
from services.swarm.settings import SwarmSettings

MANIFEST = Manifest(
    name="swarm",
    summary="Conversations with agents: handoffs within a swarm, tools, agents, graphs and workflows as tools, "
    "sessions per tenant, limits on by default",
    consumes=(
        Consume(
            "turn",
            subjects.SWARM_TURNS,
            Kind.SWARM_TURN,
            SwarmTurn,
            "One turn of a conversation with a swarm or an agent the tenant's routes name (from the router, "
            "or from an agent calling another as a tool)",
        ),
    ),
    publishes=(
        Publishes(
            subjects.ALL_EVENTS,
            "Progress of one turn (agent_started, tool_called, handoff, message, limit_reached, completed, "
            "failed); a tenant may subscribe",
            RunEvent,
            address="t.{tenant}.events.{principal}.{run_id}",
        ),
    ),
    requests=(subjects.TOOL_CALLS, subjects.GRAPH_RUNS, subjects.WORKFLOW_STARTS, subjects.SWARM_TURNS),
    jetstream=(*kv_api(BUCKET), *watch_api(BUCKET), "$JS.API.INFO"),
    settings=SwarmSettings,
)
