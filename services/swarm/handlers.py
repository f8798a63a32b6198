"""The swarm service's bus layer: claim the session, run the turn, keep the session, answer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterable
from typing import Any

from pydantic_core import to_json

from contracts import subjects
from contracts.agents import SwarmDefinition, single_agent
from contracts.definitions import Catalog, Pattern
from contracts.envelope import EventType, Kind, RunEvent, SwarmTurn, new_id
from contracts.errors import Conflict, CorralError, Internal, InvalidRequest, NotFound
from services.llm import MODEL_TOKENS, MODEL_TOKENS_HELP, ModelRegistry
from services.runtime.census import Census
from services.runtime.service import Request, Service
from services.runtime.tasks import cancel_and_wait
from services.swarm.sessions import BUCKET, Sessions
from services.swarm.settings import SwarmSettings
from services.swarm.turn import Session, Turn, bounded

EVENTS = {
    "agent_started": EventType.AGENT_STARTED,
    "tool_called": EventType.TOOL_CALLED,
    "handoff": EventType.HANDOFF,
    "message": EventType.MESSAGE,
    "limit_reached": EventType.LIMIT_REACHED,
}


def register(service: Service, catalog: Catalog, models: ModelRegistry | None = None) -> Sessions:
    """Bind the swarm service's operation on ``service``; returns the sessions (for tests)."""
    registry = models or ModelRegistry(catalog.models)
    registry.meter.counts = service.stats.counter(MODEL_TOKENS, MODEL_TOKENS_HELP, key="model").add
    # Kept sessions created by a turn that was saved (its turns are the ``turn`` operation's messages).
    sessions_started = service.stats.counter("swarm_sessions_started", "Swarm sessions started")
    settings = SwarmSettings.of(service.settings)
    sessions = Sessions(settings.swarm_session_idle_s)
    # Sessions spoken in within the idle window (the bucket's age limit), per tenant: a census of
    # the bucket, the same on every replica, so a shared gauge (the monitor takes one replica's).
    # Only the keys' write times are read (headers only), never a conversation.
    census = Census(BUCKET, lambda _: "active", idle=True, headers_only=True, log=service.log)
    service.stats.gauge(
        "swarm_sessions_active",
        "Swarm sessions spoken in within the idle window (from the session bucket)",
        read=census.totals,
        shared=True,
        revision=lambda: census.revision,
    )
    schemas = _tool_schemas(catalog)
    # What each tenant's routes let it talk to: its swarms, its orchestrators' agents, and the
    # agents those may call as tools (only as tools: a turn of depth > 0).
    swarms: dict[str, dict[str, SwarmDefinition]] = {}
    fronts: dict[str, frozenset[str]] = {}
    callees: dict[str, frozenset[str]] = {}

    def reach(current: Catalog, tenants: Iterable[str]) -> None:
        for tenant in tenants:  # a turn already started keeps the swarm it was given
            policy = current.tenants.get(tenant)
            routes = policy.routes.values() if policy else ()
            swarms[tenant] = {r.swarm: current.swarms[r.swarm] for r in routes if r.pattern is Pattern.SWARM}
            fronts[tenant] = frozenset(r.agent for r in routes if r.pattern is Pattern.ORCHESTRATOR)
            callees[tenant] = current.agents_of(tenant)

    reach(catalog, catalog.tenants)
    service.follow_tenants(catalog).on_change(reach)

    async def setup() -> None:
        await sessions.setup(service.nc)
        census.start(service.nc)  # in the background: it never holds up the start

    service.on_start(setup)
    service.on_draining(census.stop)
    service.on_stop(registry.aclose)

    def swarm_of(req: Request[SwarmTurn]) -> SwarmDefinition:
        payload, tenant = req.payload, req.tenant
        if (payload.swarm is None) == (payload.agent is None):
            raise InvalidRequest("a turn names either a swarm or an agent")
        if payload.swarm is not None:
            found = swarms.get(tenant, {}).get(payload.swarm)
            if found is None:  # the same answer for a swarm that does not exist and another tenant's
                raise NotFound(f"swarm {payload.swarm!r} is not defined for tenant {tenant!r}")
            return found
        agent = payload.agent
        allowed = agent in fronts.get(tenant, ()) or (payload.depth > 0 and agent in callees.get(tenant, ()))
        if not allowed:
            raise NotFound(f"agent {agent!r} is not defined for tenant {tenant!r}")
        return single_agent(agent)

    @service.handler("turn")
    async def turn(req: Request[SwarmTurn]) -> Any:
        payload, tenant = req.payload, req.tenant
        req.stream = payload.stream
        swarm = swarm_of(req)
        started = time.perf_counter()
        bus = _TurnOnBus(req, service, payload.depth)
        conversation = Turn(swarm, catalog.agents, catalog.guardrails, schemas, registry, tenant, bus)
        fresh = Session(swarm=swarm.name, agent=swarm.entry, principal=req.principal)
        if not payload.keep:  # an agent called as a tool: nothing kept
            outcome = await conversation.run(fresh, payload.message)
            return {"agent": outcome.agent, "message": outcome.message, "tokens": outcome.tokens}
        session_id, turn_id, claim_s = payload.session or new_id(), new_id(), settings.swarm_claim_s
        session, revision = await sessions.claim(
            tenant, session_id, turn_id, claim_s, new=fresh, principal=req.principal, fresh=payload.session is None
        )
        created = session is fresh
        if session.swarm != swarm.name:
            await sessions.release(tenant, session_id, session, revision, created)
            raise Conflict(f"session {session_id!r} is a conversation with {session.swarm!r}, not {swarm.name!r}")
        # The session as it was (a turn only appends messages and replaces the other fields).
        before = dataclasses.replace(session, messages=list(session.messages), context=dict(session.context))
        claim = _Claim(revision)
        keeper = asyncio.create_task(_keep(sessions, tenant, session_id, before, turn_id, claim_s, claim))
        await req.emit(
            RunEvent(
                type=EventType.STARTED,
                service=service.name,
                data={"swarm": swarm.name, "agent": session.agent, "session": session_id},
            )
        )
        try:
            outcome = await conversation.run(session, payload.message)
        except BaseException as error:
            await _stopped(keeper)
            await sessions.release(tenant, session_id, before, claim.revision, created)
            known = error if isinstance(error, CorralError) else Internal("internal error")
            _logged(service, req, swarm, started, known.code.value)
            if isinstance(error, Exception):
                await req.emit(
                    _finished(service, EventType.FAILED, started, {"code": known.code.value, "message": known.message})
                )
            raise
        await _stopped(keeper)
        session.messages = bounded(session.messages, swarm.session.max_messages)
        await sessions.save(tenant, session_id, session, claim.revision)
        if created:
            sessions_started.add(tenant)
        answer = {
            "session": session_id,
            "agent": outcome.agent,
            "message": outcome.message,
            "handoffs": outcome.handoffs,
            "tool_calls": outcome.tool_calls,
            "model_calls": outcome.model_calls,
            "tokens": outcome.tokens,
        }
        await req.emit(
            _finished(service, EventType.COMPLETED, started, {"agent": outcome.agent, "session": session_id})
        )
        _logged(service, req, swarm, started, "ok")
        return answer

    return sessions


class _Claim:
    """The revision of a running turn's claim on its session (renewals move it on)."""

    def __init__(self, revision: int) -> None:
        self.revision = revision


async def _keep(
    sessions: Sessions, tenant: str, session_id: str, before: Session, turn: str, claim_s: float, claim: _Claim
) -> None:
    """Renew a running turn's claim a third of the way through, until cancelled."""
    while True:
        await asyncio.sleep(claim_s / 3)
        with contextlib.suppress(Exception):  # a failed renewal is tried again; the save checks the claim
            claim.revision = await sessions.renew(tenant, session_id, before, turn, claim_s, claim.revision)


async def _stopped(task: asyncio.Task[None]) -> None:
    await cancel_and_wait(task)  # a claim renewal can lose one cancellation (services/runtime/tasks.py)


class _TurnOnBus:
    """A turn's reach outside the service, under the request's tenant (from its subject)."""

    def __init__(self, req: Request[SwarmTurn], service: Service, depth: int) -> None:
        self.req = req
        self.service = service
        self.depth = depth

    async def call_tool(self, tool: str, arguments: dict[str, Any], timeout: float) -> Any:
        req = self.req
        call = to_json({"tool": tool, "arguments": arguments})
        return await req.call_json(subjects.tool_call(req.tenant, tool), Kind.TOOL_CALL, call, timeout=timeout)

    async def call_agent(self, agent: str, message: str, timeout: float) -> Any:
        req = self.req
        turn = to_json(
            {"agent": agent, "message": message, "keep": False, "depth": self.depth + 1, "stream": req.stream}
        )
        # The callee's events are the caller's run's: the same run id, so they nest in its stream.
        answer = await req.call_json(subjects.swarm_turn(req.tenant), Kind.SWARM_TURN, turn, timeout=timeout)
        return {"agent": agent, "answer": answer.get("message") if isinstance(answer, dict) else answer}

    async def run_graph(self, graph: str, arguments: dict[str, Any], timeout: float) -> Any:
        req = self.req
        run = to_json({"graph": graph, "input": arguments, "stream": req.stream})
        return await req.call_json(subjects.graph_run(req.tenant), Kind.GRAPH_RUN, run, timeout=timeout)

    async def start_workflow(self, workflow: str, arguments: dict[str, Any], timeout: float) -> Any:
        # A workflow run is a run of its own (its own id, history and events): started, not awaited.
        req = self.req.with_run_id(new_id())
        start = to_json({"workflow": workflow, "input": arguments, "stream": False})
        return await req.call_json(subjects.workflow_start(req.tenant), Kind.WORKFLOW_START, start, timeout=timeout)

    async def event(self, kind: str, data: dict[str, Any]) -> None:
        await self.req.emit(RunEvent(type=EVENTS[kind], service=self.service.name, node=data.get("agent"), data=data))

    def audit(self, action: str, outcome: str, **detail: Any) -> None:
        self.req.audit(action, outcome, **detail)


def _tool_schemas(catalog: Catalog) -> dict[str, dict[str, Any]]:
    """What a model is told of each thing an agent may call: tools, agents, graphs, workflows."""
    schemas: dict[str, dict[str, Any]] = {}
    for name, tool in catalog.tools.items():
        schemas[name] = {"name": name, "description": tool.description, "parameters": tool.parameters}
    for name, agent in catalog.agents.items():
        schemas[name] = {
            "name": name,
            "description": agent.description or f"ask {name}",
            "parameters": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]},
        }
    for name, graph in catalog.graphs.items():
        parameters = getattr(graph, "input_schema", None) or {"type": "object"}
        schemas[name] = {"name": name, "description": graph.description, "parameters": parameters}
    for name, workflow in catalog.workflows.items():
        parameters = workflow.input_schema or {"type": "object"}
        schemas[name] = {"name": name, "description": workflow.description, "parameters": parameters}
    return schemas


def _logged(service: Service, req: Request[SwarmTurn], swarm: SwarmDefinition, started: float, outcome: str) -> None:
    """The turn's ``run_finished`` line (services/runtime/logging.py: RunLog)."""
    pattern = "swarm" if req.payload.swarm is not None else "orchestrator"
    elapsed_ms = (time.perf_counter() - started) * 1000
    service.runs.finished(req.tenant, req.envelope.run_id, pattern, None, outcome, elapsed_ms, swarm.name)


def _finished(service: Service, kind: EventType, started: float, data: dict[str, Any]) -> RunEvent:
    return RunEvent(type=kind, service=service.name, elapsed_ms=(time.perf_counter() - started) * 1000, data=data)
