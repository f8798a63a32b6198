"""The workflow service's bus layer: start runs, take signals and queries, drive runs on wake-ups."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jsonschema

from contracts import subjects
from contracts.definitions import Catalog, TenantPolicy
from contracts.envelope import EventType, RunEvent, WorkflowQuery, WorkflowSignal, WorkflowStart, WorkflowTask, new_id
from contracts.errors import Conflict, Forbidden, InvalidRequest, LimitExceeded, NotFound, Unavailable
from contracts.workflows import CANCEL_SIGNAL, ToolStep
from services.llm import MODEL_TOKENS, MODEL_TOKENS_HELP, ModelRegistry
from services.runtime.census import Census
from services.runtime.logging import run_targets
from services.runtime.service import Request, Service
from services.toolkit.runtime import tool_runtime
from services.workflow.driver import Driver, Library, open_state, summary
from services.workflow.engine import MAX_BUFFERED_SIGNALS, Ev, RunState, later_waits, started, waiting_step
from services.workflow.settings import WorkflowSettings
from services.workflow.store import RUNS_BUCKET, Lease, StaleHistory, Store, input_hash

# Tries of a signal whose run moved on between reading it and appending (each reads it again).
SIGNAL_TRIES = 5
MAX_SHOWN_OUTPUT = 4096


def register(service: Service, catalog: Catalog, models: ModelRegistry | None = None) -> Driver:
    """Bind the workflow service's operations on ``service``; returns the driver (for tests)."""
    library = Library(catalog.workflows)
    registry = models or ModelRegistry(catalog.models)
    registry.meter.counts = service.stats.counter(MODEL_TOKENS, MODEL_TOKENS_HELP, key="model").add
    store = Store(history_max_bytes=WorkflowSettings.of(service.settings).workflow_history_max_bytes)
    driver = Driver(service, store, library, registry)
    # Runs not finished, by state (running, waiting, sleeping), per tenant: a census of the run
    # index, the same on every replica, so a shared gauge (the monitor takes one replica's).
    census = Census(RUNS_BUCKET, open_state, log=service.log)
    service.stats.gauge(
        "workflow_runs_open",
        "Workflow runs not finished, by state (from the run index)",
        read=census.counts,
        key="state",
        shared=True,
        revision=lambda: census.revision,
    )
    driver.targets = run_targets(catalog, "workflow")  # the route of each run, for its log line
    live = service.follow_tenants(catalog)  # a run keeps the route (and params) it started with

    def tenants_changed(current: Catalog, changed: frozenset[str]) -> None:
        driver.targets.update(run_targets(current, "workflow", changed))

    live.on_change(tenants_changed)
    local = {
        step.tool for w in catalog.workflows.values() for step in w.walk() if isinstance(step, ToolStep) and step.local
    }
    if local:  # the tools of local steps, and only those: no other tool's code is imported here
        only_local = catalog.model_copy(update={"tools": {n: t for n, t in catalog.tools.items() if n in local}})
        driver.tools = tool_runtime(service, only_local, live=live)
    schemas = {
        name: jsonschema.validators.validator_for(w.input_schema)(w.input_schema)
        for name, w in catalog.workflows.items()
        if w.input_schema is not None
    }

    async def setup() -> None:
        await store.setup(service.nc, service.requester)
        census.start(service.nc)  # in the background: it never holds up the start

    def draining() -> None:
        driver.stopping = True
        census.stop()

    service.on_start(setup)
    service.on_draining(draining)
    service.on_stop(registry.aclose)

    @service.handler("start")
    async def start(req: Request[WorkflowStart]) -> Any:
        payload, tenant = req.payload, req.tenant
        route = live.catalog.workflows_of(tenant).get(payload.workflow)
        if route is None:  # the same answer for a workflow that does not exist and one not the tenant's
            raise NotFound(f"workflow {payload.workflow!r} is not defined for tenant {tenant!r}")
        compiled = library.current[payload.workflow]
        schema = schemas.get(payload.workflow)
        if schema is not None:
            problem = next(iter(schema.iter_errors(payload.input)), None)
            if problem is not None:
                where = ".".join(str(p) for p in problem.absolute_path) or "input"
                raise InvalidRequest(f"input of workflow {payload.workflow!r}: {where}: {problem.message}")
        run_id = req.envelope.run_id or new_id()
        key = req.envelope.idempotency_key
        if key is not None:
            claimed = await store.claim(tenant, key, run_id, input_hash([payload.workflow, payload.input]))
            if claimed is not None:
                if claimed["input"] != input_hash([payload.workflow, payload.input]):
                    raise Conflict("this idempotency key started a run with another input; use a new key")
                existing = await store.get(RUNS_BUCKET, f"{tenant}.{claimed['run_id']}")
                if existing is not None:
                    if existing.get("status") == "running":  # in case its start stopped short of its wake-up
                        await store.wake(tenant, claimed["run_id"])
                    return {**_shown(existing), "deduplicated": True}
                run_id = claimed["run_id"]  # claimed by a start that did not get further: finish it
        _check_open_runs(live.policy(tenant), census, tenant)
        event = {
            "type": Ev.RUN_STARTED,
            "run_id": run_id,
            "workflow": payload.workflow,
            "digest": compiled.digest,
            "definition": compiled.snapshot,
            "input": payload.input,
            "params": route.params,
            "principal": req.principal,
            "idempotency_key": key,
            "trace": req.envelope.trace,  # every step's call and event carries the start's trace on
            "correlation_id": req.envelope.correlation_id or req.envelope.id,  # and its correlation id
            "stream": payload.stream,  # its starter watches: every step's events (else its outcomes only)
            "at": time.time(),
        }
        state = started(event, tenant, 0)
        # Driven on here at once when there is room (no wake-up to wait for): its first moves
        # (the start of its first steps) are appended with its start, in one message, and the
        # lease and the run's recovery timer (another replica takes it over if this one dies)
        # are written meanwhile. Otherwise a wake-up through the work queue.
        lease: Lease | None = None
        opening = None
        if driver.can_drive_inline(tenant):
            opening = driver.opening(state)
            appended, lease, timer = await asyncio.gather(
                store.append(tenant, run_id, [event, *opening.events], 0),
                store.lease(tenant, run_id, driver.owner, driver.settings.workflow_lease_s),
                store.wake_at(tenant, run_id, time.time() + driver.recovery_s),
                return_exceptions=True,
            )
            if isinstance(lease, BaseException):
                lease = None
            state.timer = not isinstance(timer, BaseException)
        else:
            appended = await asyncio.gather(store.append(tenant, run_id, [event], 0), return_exceptions=True)
            appended = appended[0]
        if isinstance(appended, BaseException):
            if lease is not None:
                await store.release(lease)
            if not isinstance(appended, StaleHistory):
                raise appended
            if key is not None:  # a start with the same key got there first (or stopped short of its wake-up)
                await store.wake(tenant, run_id)
                return {"run_id": run_id, "workflow": payload.workflow, "status": "running", "deduplicated": True}
            raise Conflict(f"run id {run_id!r} is already in use") from None
        state.seq = appended
        driver.runs_counted.add(tenant, 1, "started")
        req.audit("workflow_start", "accepted", workflow=payload.workflow, digest=compiled.digest)
        req.stream = payload.stream
        if req.stream:  # before the first step's events
            await req.emit(RunEvent(type=EventType.STARTED, service=service.name, data={"workflow": payload.workflow}))
        if lease is not None:
            driver.drive_inline(state, lease, index=summary(state), opening=opening)
        else:
            # (Its first steps, if recorded as started, run as interrupted attempts: once more.)
            driver.remember(state, fresh=True)
            await asyncio.gather(store.index(tenant, run_id, summary(state)), store.wake(tenant, run_id))
        return {"run_id": run_id, "workflow": payload.workflow, "digest": compiled.digest, "status": "running"}

    @service.handler("signal")
    async def signal(req: Request[WorkflowSignal]) -> Any:
        payload, tenant, principal = req.payload, req.tenant, req.principal
        rest = req.subject.rest  # ("signal", <principal>[, <scope>])
        scope = subjects.scope_of(rest[2]) if len(rest) > 2 else None
        if len(rest) > 3:
            raise InvalidRequest("a signal subject names a principal and at most one scope")
        for _ in range(SIGNAL_TRIES):
            state = await _run_of(driver, tenant, payload.run_id, principal, service.principal_scoped(tenant))
            if state.finished:
                raise Conflict(f"run {payload.run_id!r} is {state.finished}; it takes no more signals")
            workflow = library.of(state)
            if payload.signal == CANCEL_SIGNAL:
                needed = workflow.definition.cancel_scope
                if needed is not None and scope != needed:
                    req.audit("workflow_cancel", "refused", needs=needed)
                    raise Forbidden(f"cancelling this run needs scope {needed!r}; send the signal as its holder")
                if state.cancel is not None:
                    return {"run_id": state.run_id, "signal": CANCEL_SIGNAL, "status": "cancelling"}
                event: dict[str, Any] = {"type": Ev.CANCEL_REQUESTED, "by": principal, "scope": scope}
            else:
                step = waiting_step(state, workflow, payload.signal)
                if step is None:
                    event = _early(state, workflow, payload, principal, scope, req)
                else:
                    if step.scope is not None and scope != step.scope:
                        req.audit("workflow_signal", "refused", step=step.name, needs=step.scope)
                        raise Forbidden(
                            f"signal {payload.signal!r} of step {step.name!r} needs scope {step.scope!r}; "
                            "send it as a holder of that scope"
                        )
                    event = {
                        "type": Ev.SIGNAL_RECEIVED,
                        "step": step.name,
                        "signal": payload.signal,
                        "by": principal,
                        "scope": scope,
                        "data": payload.data,
                    }
            event["at"] = time.time()
            try:
                await store.append(tenant, state.run_id, [event], state.seq)
            except StaleHistory:
                continue  # the run moved on meanwhile: read it again and check again
            break
        else:
            raise Unavailable(f"run {payload.run_id!r} kept changing; send the signal again")
        buffered = event["type"] == Ev.SIGNAL_BUFFERED
        if not buffered:  # a buffered signal is taken when the run gets to its wait: nothing to wake
            await store.wake(tenant, state.run_id)
        detail = {"step": event.get("step"), "scope": scope}
        outcome = "buffered" if buffered else "accepted"
        req.audit("workflow_signal", outcome, signal=payload.signal, **{k: v for k, v in detail.items() if v})
        answer = {"run_id": state.run_id, "signal": payload.signal, "step": event.get("step"), "accepted": True}
        return {**answer, "buffered": True} if buffered else answer

    @service.handler("query")
    async def query(req: Request[WorkflowQuery]) -> Any:
        payload, tenant = req.payload, req.tenant
        if payload.op == "list":
            runs = await store.runs(tenant, limit=1000)
            if service.principal_scoped(tenant):
                runs = [run for run in runs if run.get("principal") == req.principal]
            if payload.status is not None:
                runs = [run for run in runs if run.get("status") == payload.status]
            return {"runs": [_shown(run) for run in runs[: payload.limit]]}
        if payload.run_id is None:
            raise InvalidRequest("show needs a run_id")
        state = await _run_of(driver, tenant, payload.run_id, req.principal, service.principal_scoped(tenant))
        events = await store.read(tenant, payload.run_id)
        page = events[payload.after : payload.after + payload.limit]
        shown = [{"seq": seq, **_trimmed(event)} for seq, event in page]
        more = payload.after + len(page) < len(events)
        return {"run": summary(state), "events": shown, "next": payload.after + len(page) if more else None}

    @service.handler("task")
    async def task(req: Request[WorkflowTask]) -> Any:
        delay = await driver.drive(req.tenant, req.payload.run_id)
        if delay is not None:
            req.redeliver = delay
        return None

    return driver


def _check_open_runs(policy: TenantPolicy | None, census: Census, tenant: str) -> None:
    """Refuse a new run past the tenant's ``max_open_runs``, counted by the census of the run
    index (the same on every replica). A run is in the index once it waits, sleeps or has run
    for INDEX_AFTER_S, so a burst of starts can pass the limit by what the rate limit admits in
    that time; what accumulates, runs left waiting, is bounded."""
    if policy is None or not census.synced.is_set():
        return
    open_now = sum(census.counts().get(tenant, {}).values())
    if open_now >= policy.max_open_runs:
        raise LimitExceeded(
            f"tenant {tenant!r} has {open_now} workflow runs open, its limit (max_open_runs {policy.max_open_runs}): "
            "let some finish, or cancel them"
        )


async def _run_of(driver: Driver, tenant: str, run_id: str, principal: str | None, scoped: bool) -> RunState:
    """The run of this tenant (and, for a principal-scoped tenant, of this principal), or a
    not-found error that says the same for a run that does not exist and one that is not theirs."""
    state = await driver.load(tenant, run_id)
    if state is None or (scoped and state.principal != principal):
        raise NotFound(f"no run {run_id!r} for this tenant")
    return state


def _early(
    state: RunState, workflow: Any, payload: WorkflowSignal, principal: str | None, scope: str | None, req: Request[Any]
) -> dict[str, Any]:
    """A signal for a wait the run has not reached yet: kept in its history until it gets there
    (refused if no wait ahead takes it, or none takes it from this sender's scope)."""
    ahead = later_waits(state, workflow, payload.signal)
    if not ahead:
        waiting = sorted({workflow.steps[name].signal for name in state.waits if name not in state.outputs})
        raise Conflict(
            f"run {payload.run_id!r} has no wait ahead for signal {payload.signal!r}"
            + (f" (it waits for {', '.join(waiting)})" if waiting else "")
        )
    if not any(step.scope is None or step.scope == scope for step in ahead):
        needed = sorted({step.scope for step in ahead if step.scope})
        req.audit("workflow_signal", "refused", needs=",".join(needed))
        raise Forbidden(
            f"signal {payload.signal!r} needs scope {' or '.join(map(repr, needed))}; send it as a holder of that scope"
        )
    if len(state.buffered) >= MAX_BUFFERED_SIGNALS:
        raise Conflict(f"run {payload.run_id!r} already keeps {MAX_BUFFERED_SIGNALS} signals for waits ahead")
    return {
        "type": Ev.SIGNAL_BUFFERED,
        "signal": payload.signal,
        "by": principal,
        "scope": scope,
        "data": payload.data,
    }


def _shown(run: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in run.items() if key != "digest"}


def _trimmed(event: dict[str, Any]) -> dict[str, Any]:
    """A history event as ``show`` returns it: large values (definitions, outputs) cut short."""
    shown = {key: value for key, value in event.items() if key != "definition"}
    for key in ("output", "input", "data"):
        if key in shown and len(repr(shown[key])) > MAX_SHOWN_OUTPUT:
            shown[key] = {"truncated": True, "size": len(repr(shown[key]))}
    return shown
