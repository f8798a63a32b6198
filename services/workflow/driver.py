"""Driving one run on: take its lease, read its state, do what the engine's plan says, record
every outcome, and let the run go when it waits.

One replica drives a run at a time (the lease, renewed while it works); every event it records
is appended after the sequence it last saw, so a replica that lost its lease (paused past the
lease, then woke) cannot commit anything. Signals and cancellations are appended by whichever
replica receives them; the driver folds them in when its next append finds the history moved on.

What happens when a process dies:
- the driving replica (kill -9): its wake-up is not acknowledged, so the broker hands it to
  another replica after the task's ack wait (2 s), whose lease is free by then (2 s without a
  renewal); it reads the history and goes on. A step that was running there has a
  ``step_started`` and no outcome: it runs again with the same idempotency key.
- the driving replica (SIGTERM): it stops starting steps, lets running ones finish and be
  recorded (up to the drain timeout), releases the lease and hands the wake-up back at once.
- the broker: every write is acknowledged by JetStream before the run goes on; a write that
  fails leaves the wake-up unacknowledged, and the run continues from its last recorded event.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
from pydantic_core import to_json

from contracts import subjects
from contracts.envelope import EventType, GraphRun, Kind, new_envelope_json
from contracts.errors import CorralError, ErrorCode, InvalidRequest
from contracts.traceparent import child, new_span_id
from contracts.workflows import FunctionStep, GraphStep, ModelStep, ToolStep, WorkflowDefinition
from services.llm import ModelRegistry
from services.runtime.service import Service
from services.runtime.tasks import cancel_and_wait
from services.toolkit.registry import ToolRegistry
from services.toolkit.runtime import invoke
from services.workflow.engine import (
    DRIVER_EVENTS,
    CompiledWorkflow,
    Ev,
    RunCompensation,
    RunState,
    RunStep,
    apply,
    plan,
    started,
    step_failure,
)
from services.workflow.settings import WorkflowSettings
from services.workflow.store import SNAPSHOT_EVERY, Lease, StaleHistory, Store

# Events of the run a watching client sees, from the history's events.
EVENTS = {
    Ev.STEP_STARTED: EventType.STEP_STARTED,
    Ev.STEP_COMPLETED: EventType.STEP_COMPLETED,
    Ev.WAITING: EventType.WAITING,
    Ev.SIGNAL_RECEIVED: EventType.SIGNAL_RECEIVED,
    Ev.SIGNAL_BUFFERED: EventType.SIGNAL_BUFFERED,
    Ev.SLEEPING: EventType.SLEEPING,
    Ev.RUN_FAILING: EventType.COMPENSATING,
    Ev.CANCEL_REQUESTED: EventType.COMPENSATING,
    Ev.COMPENSATION_COMPLETED: EventType.COMPENSATED,
    Ev.RUN_COMPLETED: EventType.COMPLETED,
    Ev.RUN_FAILED: EventType.FAILED,
    Ev.RUN_CANCELLED: EventType.CANCELLED,
}
# The events a run whose starter does not watch its progress still publishes: where it ended
# or stopped to wait (what a client following it waits for). Every event is in its history.
OUTCOMES = frozenset({EventType.WAITING, EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED})
# What the audit trail records of a run (every step's outcome, who approved, how it ended).
AUDITED = {
    Ev.STEP_COMPLETED: ("workflow_step", "ok"),
    Ev.STEP_FAILED: ("workflow_step", "failed"),
    Ev.SIGNAL_RECEIVED: ("workflow_signal", "accepted"),
    Ev.CANCEL_REQUESTED: ("workflow_cancel", "accepted"),
    Ev.COMPENSATION_COMPLETED: ("workflow_compensation", "ok"),
    Ev.COMPENSATION_FAILED: ("workflow_compensation", "failed"),
    Ev.RUN_COMPLETED: ("workflow_run", "completed"),
    Ev.RUN_FAILED: ("workflow_run", "failed"),
    Ev.RUN_CANCELLED: ("workflow_run", "cancelled"),
}
CACHED_RUNS = 4096
# A run driven on from its start is woken elsewhere this long after its lease lapses.
RECOVERY_MARGIN_S = 0.1
# A run driven on from its start is listed once it has run this long (or ends, or waits).
INDEX_AFTER_S = 0.5


class LeaseLost(Exception):
    """Another replica drives the run now: this one stops without writing anything more."""


class Library:
    """Compiled workflows by digest: the catalog's current ones, and old ones that running runs
    are pinned to (compiled from the run's own snapshot of its definition)."""

    def __init__(self, workflows: dict[str, WorkflowDefinition]) -> None:
        self.current = {name: CompiledWorkflow(definition) for name, definition in workflows.items()}
        self._by_digest = {compiled.digest: compiled for compiled in self.current.values()}

    def of(self, state: RunState) -> CompiledWorkflow:
        found = self._by_digest.get(state.digest)
        if found is None:
            found = CompiledWorkflow(WorkflowDefinition.model_validate(state.definition))
            self._by_digest[state.digest] = found
        return found


class Driver:
    """Drives runs for one replica of the workflow service."""

    def __init__(self, service: Service, store: Store, library: Library, models: ModelRegistry) -> None:
        self.service = service
        self.store = store
        self.library = library
        self.models = models
        self.settings = WorkflowSettings.of(service.settings)
        self.owner = service.stats.replica_id
        # The tools of ``local`` steps, called in this replica (None: no workflow has one), and
        # their calls by outcome (the tools service counts the others as its own operation).
        self.tools: ToolRegistry | None = None
        self.local_calls = service.stats.counter(
            "workflow_local_tool_calls", "Tool calls of local steps, made in this replica, by outcome", key="outcome"
        )
        self.tenant_keys = frozenset(service.settings.tenant_argument_aliases)
        # Runs this replica drove last, with the sequence it saw: a wake-up that comes back here
        # need not read the history again (an append that finds it moved on reads the rest).
        self._cache: OrderedDict[tuple[str, str], RunState] = OrderedDict()
        self._fresh: set[tuple[str, str]] = set()
        self._functions: dict[str, Callable[..., Any]] = {}
        # Runs driven on from the start that created them (no wake-up in between), per tenant.
        self._inline: dict[str, int] = {}
        # Runs being driven by this replica right now, per tenant (the statistics' gauge), and
        # which: a wake-up for one of them waits until that drive is over (:meth:`drive`).
        self._driving: dict[str, int] = {}
        self._active: set[tuple[str, str]] = set()
        # Runs started, and finished by outcome, by this replica (its statistics; the run index
        # in KV is the authoritative list of a tenant's runs and their states).
        self.runs_counted = service.stats.counter(
            "workflow_runs", "Workflow runs started, and finished by outcome", key="outcome"
        )
        service.stats.gauge("workflow_runs_driven", "Workflow runs this replica drives now", read=lambda: self._driving)
        self.stopping = False
        # tenant -> workflow -> the route(s) that start it, for a finished run's log line.
        self.targets: dict[str, dict[str, str]] = {}

    @property
    def recovery_s(self) -> float:
        """How long after its last lease renewal a run whose replica died is woken elsewhere."""
        return self.settings.workflow_lease_s + RECOVERY_MARGIN_S

    def can_drive_inline(self, tenant: str) -> bool:
        """Whether a run just started here may be driven on at once: not while stopping, and
        within this replica's share of in-flight work (total and the tenant's); otherwise it
        goes through the work queue like any wake-up, where the same limits hold."""
        settings = self.service.settings
        return (
            not self.stopping
            and sum(self._inline.values()) < settings.max_in_flight
            and self._inline.get(tenant, 0) < settings.max_in_flight_per_tenant
        )

    def opening(self, state: RunState) -> Opening:
        """A fresh run's first moves, taken into its state before anything is written: the
        decisions its plan records and the start of its first steps, to be appended in the
        same message as its ``run_started`` (one write where there were two). Their calls begin
        only once that message is acknowledged (:meth:`drive_inline`), never before the run
        exists: a replica that dies first leaves no side effect of a run nobody was told of."""
        workflow = self.library.of(state)
        events: list[dict[str, Any]] = []

        def record(event: dict[str, Any]) -> None:
            event.setdefault("at", time.time())
            apply(state, event, state.seq)
            events.append(event)

        while (step_plan := plan(state, workflow)).records:
            for event in step_plan.records:
                record(event)
        for action in step_plan.runs:  # (none once the plan is finished)
            record(_started(action))
        return Opening(events, step_plan.runs)

    def drive_inline(
        self, state: RunState, lease: Lease, index: dict[str, Any], opening: Opening | None = None
    ) -> None:
        """Drive a run this replica has just started, in the background of its start's reply.
        Its line in the run index (``index``) is written once it has run for
        :data:`INDEX_AFTER_S` (a short run is indexed once, as it ends or waits). ``opening``:
        its first moves (:meth:`opening`), already appended with its start; their events are
        published and their calls begin now.

        Its recovery timer (set with its first record) wakes it on another replica if this one
        dies; the lease's renewals push that timer on while the run is driven here."""
        tenant = state.tenant
        self._inline[tenant] = self._inline.get(tenant, 0) + 1
        self._active.add((tenant, state.run_id))

        async def go() -> None:
            indexed = Later(INDEX_AFTER_S, lambda: self.store.index(tenant, state.run_id, index))
            try:
                handed_back = await self._drive(state, lease, recovering=True, indexed=indexed, opening=opening)
                if handed_back:  # stopping: another replica goes on with it at once
                    await self.store.wake(tenant, state.run_id)
            except Exception:
                # The run stops here and goes on elsewhere from its history (its timer).
                self.service.log.exception("workflow_drive_failed", tenant_id=tenant, run_id=state.run_id)
            finally:
                try:
                    # Its first index line, usually cancelled by the run's end or wait: waited
                    # for without raising (awaiting a cancelled task raises CancelledError, which
                    # once skipped the count below and left every later run to the work queue).
                    await indexed.settled()
                finally:
                    self._active.discard((tenant, state.run_id))
                    self._inline[tenant] -= 1
                    if not self._inline[tenant]:
                        del self._inline[tenant]

        self.service.keep(asyncio.create_task(go(), name=f"workflow-{state.run_id}"))

    def remember(self, state: RunState, *, fresh: bool = False) -> None:
        """Keep a run's state for its next wake-up here. ``fresh``: just started and not yet
        driven, so its first plan appends before it can do anything (and an append that finds
        the history moved on reads what is new): no need to read the history first."""
        key = (state.tenant, state.run_id)
        self._fresh.discard(key)
        if fresh:
            self._fresh.add(key)
        self._cache[key] = state
        self._cache.move_to_end(key)
        while len(self._cache) > CACHED_RUNS:
            self._fresh.discard(self._cache.popitem(last=False)[0])

    async def load(self, tenant: str, run_id: str) -> RunState | None:
        """The run's state from its snapshot and the history after it (None: no such run)."""
        snapshot = await self.store.snapshot(tenant, run_id)
        state = RunState.from_json(snapshot) if snapshot else None
        events = await self.store.read(tenant, run_id, after=state.seq if state else 0)
        for seq, event in events:
            if state is None:
                if event.get("type") != Ev.RUN_STARTED:
                    return None
                state = started(event, tenant, seq)
            else:
                apply(state, event, seq)
        return state

    async def drive(self, tenant: str, run_id: str) -> float | None:
        """Drive the run of a wake-up as far as it goes now. Returns None when done with it
        (finished, waiting on a timer or a signal, or given up to another replica), or a delay
        after which the wake-up should come back (the run's lease is held elsewhere: that
        replica may be about to let it go; this replica drives it right now; or this replica is
        stopping: at once).

        A wake-up for a run this replica is driving now (its recovery timer firing late on a
        loaded machine, a hand-back's wake-up beside the timer's, a signal) comes back later: the
        lease is this replica's, so it would be taken again, and two drives of one run in one
        replica ran its current step twice and renewed the lease from under each other until
        both gave the run up, leaving it to nobody.
        """
        ttl = self.settings.workflow_lease_s
        key = (tenant, run_id)
        if key in self._active:
            return ttl / 2
        self._active.add(key)
        try:
            return await self._drive_woken(tenant, run_id, ttl)
        finally:
            self._active.discard(key)

    async def _drive_woken(self, tenant: str, run_id: str, ttl: float) -> float | None:
        lease = await self.store.lease(tenant, run_id, self.owner, ttl)
        if lease is None:
            return ttl / 2
        try:
            state = self._cache.pop((tenant, run_id), None)
            fresh = (tenant, run_id) in self._fresh
            self._fresh.discard((tenant, run_id))
            if state is not None and not fresh:  # what was appended since (a signal, ...), one round trip
                for seq, event in await self.store.read(tenant, run_id, after=state.seq):
                    apply(state, event, seq)
            else:
                state = await self.load(tenant, run_id)
        except BaseException:
            await self.store.release(lease)
            raise
        if state is None:
            await self.store.release(lease)
            return None  # a wake-up for a run that was never written: nothing to do
        return 0.0 if await self._drive(state, lease) else None

    async def _drive(
        self,
        state: RunState,
        lease: Lease,
        *,
        recovering: bool = False,
        indexed: Later | None = None,
        opening: Opening | None = None,
    ) -> bool:
        """Drive ``state``'s run under ``lease`` until it finishes, waits or is handed back
        (returns True: this replica is stopping and another should go on with it now).
        ``recovering``: the run has a recovery timer to keep ahead of the lease. ``indexed``:
        the write of its first line in the run index, which the next one must follow.
        ``opening``: its first moves, written with its start (:meth:`opening`)."""
        ttl = self.settings.workflow_lease_s
        keeper = Later(ttl / 3, lambda: self._keep(lease, ttl, state if recovering else None))
        run = _Run(self, state, self.library.of(state), lease, indexed)
        tenant = state.tenant
        self._driving[tenant] = self._driving.get(tenant, 0) + 1
        try:
            try:
                if opening is not None:
                    await run.open(opening)
                await run.go()
            except LeaseLost:
                self.service.log.warning("workflow_lease_lost", tenant_id=state.tenant, run_id=state.run_id)
                return False
            if not run.state.finished:
                self.remember(run.state)
            return run.handed_back
        finally:
            self._driving[tenant] -= 1
            if not self._driving[tenant]:
                del self._driving[tenant]
            await keeper.stop()
            if not run.state.finished:  # a finished run's lease key goes by itself (LEASE_KEY_MAX_AGE_S)
                await self.store.release(lease)

    async def _keep(self, lease: Lease, ttl: float, recovering: RunState | None) -> None:
        """Renew the lease (a third of the way through: the run's keeper starts this then),
        until cancelled or lost, and push the run's recovery timer on past the renewed lease."""
        while not lease.lost:
            with contextlib.suppress(Exception):  # a failed renewal is retried; expiry is the bound
                if await self.store.renew(lease, ttl) and recovering is not None:
                    await self.store.wake_at(recovering.tenant, recovering.run_id, lease.until + RECOVERY_MARGIN_S)
            await asyncio.sleep(ttl / 3)

    def function(self, target: str) -> Callable[..., Any]:
        found = self._functions.get(target)
        if found is None:
            module, _, attribute = target.partition(":")
            try:
                found = getattr(importlib.import_module(module), attribute)
            except (ImportError, AttributeError) as exc:
                raise InvalidRequest(f"cannot import function {target!r}: {exc}") from None
            self._functions[target] = found
        return found


class _Run:
    """One run being driven by this replica.

    Every write is one append of what happened since the last: a step's outcome, the decisions
    that follow from it, and the start of the next steps, whose calls begin as the append is
    written (a call is at least once with its idempotency key anyway: a replica may die
    mid-call). The state is ahead of the history only while an append is on its way; if the
    append is refused (a signal or a cancellation came in between), the calls it started are
    cancelled, the state is read again, and the outcomes are appended after what came in."""

    def __init__(
        self,
        driver: Driver,
        state: RunState,
        workflow: CompiledWorkflow,
        lease: Lease,
        indexed: Later | None = None,
    ) -> None:
        self.driver = driver
        self._indexed = indexed
        self.state = state
        self.workflow = workflow
        self.lease = lease
        self.store = driver.store
        self.service = driver.service
        self.running: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self.handed_back = False
        self._pending: list[dict[str, Any]] = []  # applied to the state, not yet appended
        self._launched: list[str] = []  # steps whose start is among them
        self._outcomes: list[dict[str, Any]] = []  # attempts' outcomes among them
        self._events_subject = subjects.events(state.tenant, state.principal, state.run_id)
        self._since_snapshot = 0
        self._was_finished = state.finished is not None  # a wake-up of a finished run counts nothing

    async def go(self) -> None:
        inline = self.driver.settings.workflow_inline_wait_s
        try:
            while True:
                if self.lease.lost:
                    raise LeaseLost
                state, workflow = self.state, self.workflow
                step_plan = plan(state, workflow, running=frozenset(self.running))
                if step_plan.records:
                    for record in step_plan.records:
                        self._record(record)
                    continue
                if not step_plan.finished and not self.driver.stopping:
                    for action in step_plan.runs:
                        if action.step not in self.running:
                            self._start(action)
                if self._pending and not await self._write():
                    continue  # refused: the state was read again, plan again
                if step_plan.finished:
                    await self._finished()
                    return
                if self.driver.stopping and not self.running:
                    self.handed_back = True
                    return
                if self.running:
                    done, _ = await asyncio.wait(set(self.running.values()), return_when=asyncio.FIRST_COMPLETED)
                    for step in sorted(step for step, task in self.running.items() if task in done):
                        outcome = self.running.pop(step).result()
                        self._record(outcome)
                        self._outcomes.append(outcome)
                    continue
                until = step_plan.until
                if until is not None and until - time.time() <= inline and not step_plan.waiting_for:
                    await asyncio.sleep(max(0.0, until - time.time()))
                    continue
                if until is not None:
                    await self.store.wake_at(state.tenant, state.run_id, until)
                    state.timer = True
                elif state.timer:  # the recovery timer of a run driven from its start
                    await self.store.cancel_timer(state.tenant, state.run_id)
                    state.timer = False
                await self._index("waiting" if step_plan.waiting_for else "sleeping", waiting_for=step_plan.waiting_for)
                return
        finally:
            for task in self.running.values():
                task.cancel()
            if self.running:
                await asyncio.wait(set(self.running.values()))

    def _record(self, event: dict[str, Any]) -> None:
        """Take ``event`` into the state now; it is appended with the next write."""
        event.setdefault("at", time.time())
        apply(self.state, event, self.state.seq)
        self._pending.append(event)

    def _start(self, action: RunStep | RunCompensation) -> None:
        """Start an attempt in its own task: its start is recorded with the next write."""
        self._record(_started(action))
        self.running[action.step] = asyncio.create_task(self._outcome(action))
        self._launched.append(action.step)

    async def open(self, opening: Opening) -> None:
        """The run's first moves, already in its history (appended with its start): their
        attempts begin, and their events go out."""
        for action in opening.actions:
            self.running[action.step] = asyncio.create_task(self._outcome(action))
        for event in opening.events:
            await self._publish(event)
        self._since_snapshot += len(opening.events)

    async def _write(self) -> bool:
        """Append what is pending in one message. False if the history had moved on: then the
        attempts this write started are cancelled, the state is read again with what came in,
        and the outcomes it carried are taken into it again, to be appended next."""
        state, events = self.state, self._pending
        try:
            seq = await self.store.append(state.tenant, state.run_id, events, state.seq)
        except StaleHistory:
            await self._refused()
            return False
        self._pending, self._launched, self._outcomes = [], [], []
        state.seq = seq
        for event in events:
            await self._publish(event)
        self._since_snapshot += len(events)
        if self._since_snapshot >= SNAPSHOT_EVERY:
            self._since_snapshot = 0
            await self.store.save_snapshot(state.tenant, state.run_id, state.to_json())
        return True

    async def _refused(self) -> None:
        state, outcomes = self.state, self._outcomes
        for _, new in await self.store.read(state.tenant, state.run_id, after=state.seq):
            if new.get("type") in DRIVER_EVENTS:
                self.lease.lost = True
                raise LeaseLost  # another replica drives the run
        launched = [self.running.pop(step) for step in self._launched if step in self.running]
        for task in launched:
            task.cancel()
        if launched:
            await asyncio.wait(launched)
        reloaded = await self.driver.load(state.tenant, state.run_id)
        if reloaded is None:
            raise LeaseLost  # the run's history is gone (purged): nothing more to write
        reloaded.timer = state.timer
        self.state, self._pending, self._launched, self._outcomes = reloaded, [], [], outcomes
        for outcome in outcomes:
            self._record(outcome)

    async def _outcome(self, action: RunStep | RunCompensation) -> dict[str, Any]:
        """Run the attempt; the ``step_completed`` or ``step_failed`` (or compensation) event."""
        state, workflow, step = self.state, self.workflow, self.workflow.steps[action.step]
        started_at = time.perf_counter()
        try:
            if isinstance(action, RunCompensation):
                await self._compensate(step, action.attempt)
                outcome: dict[str, Any] = {"type": Ev.COMPENSATION_COMPLETED, "step": step.name}
            else:
                output, tries = await self._execute(step, action.attempt)
                outcome = {"type": Ev.STEP_COMPLETED, "step": step.name, "output": output, "attempt": action.attempt}
                if tries > 1:
                    outcome["validation_attempts"] = tries
        except asyncio.CancelledError:
            raise  # stopping: no outcome recorded, the attempt runs again elsewhere
        except Exception as error:
            if isinstance(error, TimeoutError):
                code = ErrorCode.DEADLINE_EXCEEDED.value
                message = f"step {step.name!r} took longer than its timeout_s ({step.timeout_s:g} s)"
            elif isinstance(error, CorralError):
                code, message = error.code.value, error.message
            else:
                self.service.log.exception("workflow_step_crashed", step=step.name, run_id=state.run_id)
                code, message = ErrorCode.INTERNAL.value, f"{type(error).__name__}: {error}"[:500]
            compensation = isinstance(action, RunCompensation)
            outcome = step_failure(state, workflow, step.name, action.attempt, code, message, compensation=compensation)
        outcome["ms"] = round((time.perf_counter() - started_at) * 1000, 2)
        return outcome

    async def _execute(self, step: Any, attempt: int) -> tuple[Any, int]:
        """One attempt of a leaf step, with its output validated: an output outside the schema is
        tried again (a model re-asked, told why) up to the step's own validation budget."""
        schema = self.workflow.schemas.get(step.name)
        problem: str | None = None
        for tries in range(1, step.validation_attempts + 1 if schema is not None else 2):
            async with asyncio.timeout(step.timeout_s):  # (no task of its own, as wait_for makes)
                output = await self._call(step, tries, problem)
            if schema is None:
                return output, tries
            try:
                if isinstance(step, ModelStep) and isinstance(output, str):
                    output = json.loads(output)
                schema.validate(output)
                return output, tries
            except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
                problem = exc.message if isinstance(exc, jsonschema.ValidationError) else "the answer was not JSON"
        raise InvalidOutput(f"step {step.name!r}: output outside its schema after {tries} tries: {problem}")

    def _key(self, step: str, tries: int = 1) -> str:
        """The idempotency key of a step: the same for every attempt (a retry after a crash must
        not do the thing twice); a new one only for a validation retry, which asks for a new result."""
        base = f"{self.state.run_id}:{step}"
        return base if tries == 1 else f"{base}:v{tries}"

    async def _call(self, step: Any, tries: int, problem: str | None) -> Any:
        scope = self.state.scope()
        if isinstance(step, ToolStep):
            arguments = self.workflow.arguments[step.name](scope)
            key = self._key(step.name, tries)
            # A run pinned to an older definition may have a local step whose tool no current
            # one calls locally (this replica holds only those): the call goes to the tools service.
            tools = self.driver.tools
            if step.local and tools is not None and step.tool in tools.adapters:
                return await self._local_tool(tools, step.tool, arguments, step.timeout_s, key)
            return await self._tool(step.tool, arguments, step.timeout_s, key)
        if isinstance(step, FunctionStep):
            function = self.driver.function(step.callable)
            arguments = self.workflow.arguments[step.name](scope)
            if inspect.iscoroutinefunction(function):
                return await function(**arguments)
            return await asyncio.to_thread(function, **arguments)  # the lease keeps being renewed
        if isinstance(step, GraphStep):
            payload = GraphRun(graph=step.graph, input=self.workflow.arguments[step.name](scope), stream=False)
            return await self._request(
                subjects.graph_run(self.state.tenant),
                Kind.GRAPH_RUN,
                payload.model_dump_json().encode(),
                step.timeout_s,
                self._key(step.name, tries),
            )
        if isinstance(step, ModelStep):
            return await self._ask(step, scope, problem)
        raise AssertionError(f"not a leaf step: {step!r}")

    async def _ask(self, step: ModelStep, scope: dict[str, Any], problem: str | None) -> Any:
        model = step.model or self.workflow.definition.model
        assert model is not None  # checked when the workflow was defined
        system, prompt = self.workflow.templates[step.name]
        messages = [{"role": "system", "content": system(scope)}] if system else []
        messages.append({"role": "user", "content": prompt(scope)})
        if problem is not None:
            messages.append({"role": "user", "content": f"Your last answer was rejected: {problem}. Answer again."})
        completion = await self.driver.models.get(model).complete(
            messages, json_schema=step.output_schema, tools=None, timeout=step.timeout_s
        )
        self.driver.models.meter.record(self.state.tenant, model, completion.usage)
        return completion.content

    async def _compensate(self, step: Any, attempt: int) -> None:
        compensation = step.compensate
        arguments = self.workflow.compensations[step.name](self.state.scope())
        key = f"{self.state.run_id}:{step.name}:compensate"
        async with asyncio.timeout(step.timeout_s):
            await self._tool(compensation.tool, arguments, step.timeout_s, key)

    async def _tool(self, tool: str, arguments: dict[str, Any], timeout: float, key: str) -> Any:
        payload = to_json({"tool": tool, "arguments": arguments})
        return await self._request(subjects.tool_call(self.state.tenant, tool), Kind.TOOL_CALL, payload, timeout, key)

    async def _local_tool(
        self, tools: ToolRegistry, tool: str, arguments: dict[str, Any], timeout: float, key: str
    ) -> Any:
        """A ``local`` step's call, in this replica: the tools service's own checks and context
        (services/toolkit/runtime.py), audited here."""
        state, service = self.state, self.service

        def audit(action: str, outcome: str, **detail: Any) -> None:
            service.audit.record(
                state.tenant, action, outcome, principal=state.principal, run_id=state.run_id, **detail
            )

        try:
            output = await invoke(
                tools,
                self.driver.tenant_keys,
                state.tenant,
                tool,
                arguments,
                run_id=state.run_id,
                principal=state.principal,
                timeout_s=timeout,
                idempotency_key=key,
                audit=audit,
                log=service.log,
            )
        except CorralError as error:
            self.driver.local_calls.add(state.tenant, 1, error.code.value)
            raise
        self.driver.local_calls.add(state.tenant, 1, "ok")
        return output

    async def _request(self, subject: str, kind: Kind, payload: bytes, timeout: float, key: str) -> Any:
        state = self.state
        body = new_envelope_json(
            kind,
            state.tenant,
            payload,
            run_id=state.run_id,
            deadline=time.time() + timeout,
            idempotency_key=key,
            principal=state.principal,
            trace=child(state.trace, new_span_id()) if state.trace else None,
            correlation_id=state.correlation_id,
        )
        return await self.service.request(subject, body, timeout=timeout)

    # ---- recording ----------------------------------------------------------------

    async def _publish(self, event: dict[str, Any]) -> None:
        """The watchers' event and the audit record of a recorded history event."""
        state, kind = self.state, event["type"]
        if kind == Ev.STEP_FAILED:
            shown = EventType.STEP_FAILED if event.get("final") else EventType.STEP_RETRYING
        elif kind == Ev.COMPENSATION_FAILED:
            shown = EventType.STEP_FAILED
        else:
            shown = EVENTS.get(kind)
        if shown is not None and (state.progress or shown in OUTCOMES):
            data = {k: v for k, v in event.items() if k not in ("type", "step", "at", "ms", "output")}
            if kind in (Ev.STEP_COMPLETED, Ev.RUN_COMPLETED):
                data["output"] = event.get("output")
            # A RunEvent's JSON, written directly (every step publishes two).
            run_event = to_json(
                {
                    "type": shown.value,
                    "service": "workflow",
                    "node": event.get("step"),
                    "elapsed_ms": event.get("ms"),
                    "data": data,
                }
            )
            body = new_envelope_json(
                Kind.EVENT,
                state.tenant,
                run_event,
                run_id=state.run_id,
                principal=state.principal,
                trace=state.trace,
                correlation_id=state.correlation_id,
            )
            with contextlib.suppress(Exception):
                await self.service.nc.publish(self._events_subject, body)
        audited = AUDITED.get(kind)
        if audited is not None and self.service.audit_enabled:
            detail = {k: event[k] for k in ("step", "attempt", "code", "by", "scope") if event.get(k) is not None}
            principal = event.get("by") or state.principal
            self.service.audit.record(
                state.tenant, audited[0], audited[1], principal=principal, run_id=state.run_id, **detail
            )

    async def _finished(self) -> None:
        state = self.state
        runs = self.service.runs
        outcome = "ok" if state.finished == "completed" else (state.finished or "failed")
        if state.finished == "failed":
            outcome = str((state.failure or {}).get("code") or "failed")
        if runs.wanted(outcome == "ok"):
            target = self.driver.targets.get(state.tenant, {}).get(state.workflow)
            elapsed_ms = ((state.finished_at or time.time()) - state.started_at) * 1000
            runs.finished(state.tenant, state.run_id, "workflow", target, outcome, elapsed_ms, state.workflow)
        if not self._was_finished:
            self.driver.runs_counted.add(state.tenant, 1, state.finished or "failed")
        await self._index(state.finished or "finished")
        if state.timer:  # a timer left behind would only wake the finished run once more
            await self.store.cancel_timer(state.tenant, state.run_id)

    async def _index(self, status: str, **extra: Any) -> None:
        if self._indexed is not None:  # the run's first line, if on its way, goes first
            self._indexed.cancel()  # (what was sent of it is ahead on the same connection)
            await self._indexed.settled()
            self._indexed = None
        await self.store.index(self.state.tenant, self.state.run_id, summary(self.state, status, **extra))


class Later:
    """Work that begins after ``delay_s`` unless cancelled first: a timer until then, and a task
    only once it begins. Most runs are over before their first lease renewal and their first
    index line are due, and a timer costs a fraction of a task created and cancelled per run."""

    def __init__(self, delay_s: float, work: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        self._work = work
        self._task: asyncio.Task[None] | None = None
        self._done: asyncio.Future[None] = loop.create_future()  # ended, or cancelled before it began
        self._handle: asyncio.TimerHandle | None = loop.call_later(delay_s, self._begin)

    def _begin(self) -> None:
        self._handle = None
        self._task = asyncio.ensure_future(self._work())
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved here; :meth:`stop` raises it again
        if not self._done.done():
            self._done.set_result(None)

    def cancel(self) -> None:
        """Not begun: it never will. Begun: its task is cancelled (once; see :meth:`stop`)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._done.set_result(None)
        elif self._task is not None:
            self._task.cancel()

    async def settled(self) -> None:
        """Until it has ended (waited for if not begun yet and not cancelled, as a task would
        be); never raises."""
        await asyncio.wait([self._done])

    async def stop(self) -> None:
        """Cancel it and wait until it has ended; raise what it raised, if not its cancellation
        (its task is cancelled until it ends: one cancellation can be lost, tasks.py)."""
        if self._task is None:
            self.cancel()
            return
        await cancel_and_wait(self._task)


@dataclass(slots=True)
class Opening:
    """A fresh run's first moves (:meth:`Driver.opening`): the events recorded into its state
    (appended with its ``run_started``) and the attempts to begin once they are written."""

    events: list[dict[str, Any]]
    actions: list[RunStep | RunCompensation]


def _started(action: RunStep | RunCompensation) -> dict[str, Any]:
    kind = Ev.COMPENSATION_STARTED if isinstance(action, RunCompensation) else Ev.STEP_STARTED
    return {"type": kind, "step": action.step, "attempt": action.attempt}


class InvalidOutput(CorralError):
    """A step's output stayed outside its schema for its whole validation budget."""

    code = ErrorCode.INVALID_REQUEST


# A run's status in the index -> its state in the census of open runs (finished ones are not open).
OPEN_STATES = {
    "running": "running",
    "compensating": "running",
    "cancelling": "running",
    "waiting": "waiting",
    "sleeping": "sleeping",
}


def open_state(line: bytes) -> str | None:
    """The state of a run from its line in the index (a JSON :func:`summary`): ``running``,
    ``waiting`` or ``sleeping``; None for a finished run or a line that is not one."""
    try:
        status = json.loads(line).get("status")
    except (ValueError, AttributeError, RecursionError):
        return None
    return OPEN_STATES.get(status) if isinstance(status, str) else None


def summary(state: RunState, status: str | None = None, **extra: Any) -> dict[str, Any]:
    """A run's line in the index (what ``list`` shows)."""
    return {
        "run_id": state.run_id,
        "workflow": state.workflow,
        "digest": state.digest,
        "status": status or state.status,
        "principal": state.principal,
        "started_at": state.started_at,
        "finished_at": state.finished_at,
        "events": state.events,
        **extra,
    }
