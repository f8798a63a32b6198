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
from collections.abc import Callable
from typing import Any

import jsonschema
from pydantic_core import to_json

from contracts import subjects
from contracts.envelope import EventType, GraphRun, Kind, RunEvent, new_envelope_json
from contracts.errors import CorralError, ErrorCode, Internal, InvalidRequest
from contracts.workflows import FunctionStep, GraphStep, ModelStep, ToolStep, WorkflowDefinition
from services.llm import ModelRegistry
from services.runtime.service import Service
from services.workflow.engine import (
    DRIVER_EVENTS,
    CompiledWorkflow,
    Ev,
    RunCompensation,
    RunState,
    RunStep,
    apply,
    compensation_failure,
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
    Ev.SLEEPING: EventType.SLEEPING,
    Ev.RUN_FAILING: EventType.COMPENSATING,
    Ev.CANCEL_REQUESTED: EventType.COMPENSATING,
    Ev.COMPENSATION_COMPLETED: EventType.COMPENSATED,
    Ev.RUN_COMPLETED: EventType.COMPLETED,
    Ev.RUN_FAILED: EventType.FAILED,
    Ev.RUN_CANCELLED: EventType.CANCELLED,
}
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
        # Runs this replica drove last, with the sequence it saw: a wake-up that comes back here
        # need not read the history again (an append that finds it moved on reads the rest).
        self._cache: OrderedDict[tuple[str, str], RunState] = OrderedDict()
        self._fresh: set[tuple[str, str]] = set()
        self._functions: dict[str, Callable[..., Any]] = {}
        self.stopping = False

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
        """Drive the run as far as it goes now. Returns None when done with it (finished, waiting
        on a timer or a signal, or given up to another replica), or a delay after which the
        wake-up should come back (the run's lease is held elsewhere: that replica may be about
        to let it go)."""
        ttl = self.settings.workflow_lease_s
        lease = await self.store.lease(tenant, run_id, self.owner, ttl)
        if lease is None:
            return ttl / 2
        keeper = asyncio.create_task(self._keep(lease, ttl))
        try:
            state = self._cache.pop((tenant, run_id), None)
            fresh = (tenant, run_id) in self._fresh
            self._fresh.discard((tenant, run_id))
            if state is not None and not fresh:  # what was appended since (a signal, ...), one round trip
                for seq, event in await self.store.read(tenant, run_id, after=state.seq):
                    apply(state, event, seq)
            else:
                state = await self.load(tenant, run_id)
            if state is None:
                return None  # a wake-up for a run that was never written: nothing to do
            run = _Run(self, state, self.library.of(state), lease)
            try:
                await run.go()
            except LeaseLost:
                self.service.log.warning("workflow_lease_lost", tenant_id=tenant, run_id=run_id)
                return None
            if not state.finished:
                self.remember(state)
            if run.handed_back:
                return 0.0
            return None
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await self.store.release(lease)

    async def _keep(self, lease: Lease, ttl: float) -> None:
        """Renew the lease a third of the way through, until cancelled or lost."""
        while not lease.lost:
            await asyncio.sleep(ttl / 3)
            with contextlib.suppress(Exception):  # a failed renewal is retried; expiry is the bound
                await self.store.renew(lease, ttl)

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
    """One run being driven by this replica."""

    def __init__(self, driver: Driver, state: RunState, workflow: CompiledWorkflow, lease: Lease) -> None:
        self.driver = driver
        self.state = state
        self.workflow = workflow
        self.lease = lease
        self.store = driver.store
        self.service = driver.service
        self.lock = asyncio.Lock()
        self.running: dict[str, asyncio.Task[None]] = {}
        self.handed_back = False
        self.failed: BaseException | None = None
        self._events_subject = subjects.events(state.tenant, state.principal, state.run_id)
        self._since_snapshot = 0

    async def go(self) -> None:
        state, workflow = self.state, self.workflow
        inline = self.driver.settings.workflow_inline_wait_s
        try:
            while True:
                if self.lease.lost:
                    raise LeaseLost
                if self.failed is not None:
                    raise self.failed
                step_plan = plan(state, workflow, running=frozenset(self.running))
                if step_plan.records:
                    try:
                        for record in step_plan.records:
                            await self.append(record)
                    except StaleHistory:
                        pass  # folded in what was new: plan again
                    continue
                if step_plan.finished:
                    await self._finished()
                    return
                if self.driver.stopping:
                    if not self.running:
                        self.handed_back = True
                        return
                else:
                    for action in step_plan.runs:
                        if action.step not in self.running:
                            await self._start(action)
                if self.running:
                    await asyncio.wait(set(self.running.values()), return_when=asyncio.FIRST_COMPLETED)
                    continue
                if step_plan.runs:
                    continue  # a start was refused as stale: plan again with what is new
                until = step_plan.until
                if until is not None and until - time.time() <= inline and not step_plan.waiting_for:
                    await asyncio.sleep(max(0.0, until - time.time()))
                    continue
                if until is not None:
                    await self.store.wake_at(state.tenant, state.run_id, until)
                    state.timer = True
                await self._index("waiting" if step_plan.waiting_for else "sleeping", waiting_for=step_plan.waiting_for)
                return
        finally:
            for task in self.running.values():
                task.cancel()
            if self.running:
                await asyncio.wait(set(self.running.values()))

    async def _start(self, action: RunStep | RunCompensation) -> None:
        """Start an attempt in its own task, which records that it started and, once that record
        is written, its outcome. The call itself begins as the start record is written (one round
        trip less per step): an attempt is at least once with its idempotency key anyway (a
        replica may die mid-call), and if the record is refused (the history moved on) the call
        is cancelled and planned again."""
        task = asyncio.create_task(self._attempt(action))
        self.running[action.step] = task
        task.add_done_callback(lambda done: self._done(action.step, done))

    def _done(self, step: str, task: asyncio.Task[None]) -> None:
        self.running.pop(step, None)
        if not task.cancelled() and task.exception() is not None:
            # The outcome could not be recorded (the lease was lost, the broker is away): the
            # run stops here and goes on from its history, where this attempt has no outcome.
            self.failed = task.exception()

    async def _attempt(self, action: RunStep | RunCompensation) -> None:
        kind = Ev.COMPENSATION_STARTED if isinstance(action, RunCompensation) else Ev.STEP_STARTED
        call = asyncio.ensure_future(self._outcome(action))
        try:
            await self.append({"type": kind, "step": action.step, "attempt": action.attempt})
        except BaseException as error:
            call.cancel()
            with contextlib.suppress(BaseException):
                await call
            if isinstance(error, StaleHistory):
                return  # planned again with what is new
            raise
        outcome = await call
        await self.append(outcome, retry=True)

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
        except TimeoutError:
            failure = compensation_failure if isinstance(action, RunCompensation) else step_failure
            message = f"step {step.name!r} took longer than its timeout_s ({step.timeout_s:g} s)"
            outcome = failure(state, workflow, step.name, action.attempt, ErrorCode.DEADLINE_EXCEEDED.value, message)
        except Exception as error:
            known = error if isinstance(error, CorralError) else Internal(f"{type(error).__name__}: {error}"[:500])
            if not isinstance(error, CorralError):
                self.service.log.exception("workflow_step_crashed", step=step.name, run_id=state.run_id)
            failure = compensation_failure if isinstance(action, RunCompensation) else step_failure
            outcome = failure(state, workflow, step.name, action.attempt, known.code.value, known.message)
        outcome["ms"] = round((time.perf_counter() - started_at) * 1000, 2)
        return outcome

    async def _execute(self, step: Any, attempt: int) -> tuple[Any, int]:
        """One attempt of a leaf step, with its output validated: an output outside the schema is
        tried again (a model re-asked, told why) up to the step's own validation budget."""
        schema = self.workflow.schemas.get(step.name)
        problem: str | None = None
        for tries in range(1, step.validation_attempts + 1 if schema is not None else 2):
            output = await asyncio.wait_for(self._call(step, tries, problem), step.timeout_s)
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
            return await self._tool(step.tool, arguments, step.timeout_s, self._key(step.name, tries))
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
        await asyncio.wait_for(self._tool(compensation.tool, arguments, step.timeout_s, key), step.timeout_s)

    async def _tool(self, tool: str, arguments: dict[str, Any], timeout: float, key: str) -> Any:
        payload = to_json({"tool": tool, "arguments": arguments})
        return await self._request(subjects.tool_call(self.state.tenant, tool), Kind.TOOL_CALL, payload, timeout, key)

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
        )
        return await self.service.request(subject, body, timeout=timeout)

    # ---- recording ----------------------------------------------------------------

    async def append(self, event: dict[str, Any], retry: bool = False) -> None:
        """Record ``event`` after what this replica last saw. If the history moved on (a signal,
        a cancellation), the new events are folded in first; then an outcome (``retry``) is
        appended anyway, and a decision raises :class:`StaleHistory` to be planned again."""
        state = self.state
        event.setdefault("at", time.time())
        async with self.lock:
            while True:
                if self.lease.lost:
                    raise LeaseLost
                try:
                    seq = await self.store.append(state.tenant, state.run_id, event, state.seq)
                except StaleHistory:
                    for seq_new, new in await self.store.read(state.tenant, state.run_id, after=state.seq):
                        if new.get("type") in DRIVER_EVENTS:
                            self.lease.lost = True
                            raise LeaseLost from None  # another replica drives the run
                        apply(state, new, seq_new)
                    if retry:
                        continue
                    raise
                apply(state, event, seq)
                break
        await self._publish(event)
        self._since_snapshot += 1
        if self._since_snapshot >= SNAPSHOT_EVERY:
            self._since_snapshot = 0
            await self.store.save_snapshot(state.tenant, state.run_id, state.to_json())

    async def _publish(self, event: dict[str, Any]) -> None:
        """The watchers' event and the audit record of a recorded history event."""
        state, kind = self.state, event["type"]
        if kind == Ev.STEP_FAILED:
            shown = EventType.STEP_FAILED if event.get("final") else EventType.STEP_RETRYING
        elif kind == Ev.COMPENSATION_FAILED:
            shown = EventType.STEP_FAILED
        else:
            shown = EVENTS.get(kind)
        if shown is not None:
            data = {k: v for k, v in event.items() if k not in ("type", "step", "at", "ms", "output")}
            if kind in (Ev.STEP_COMPLETED, Ev.RUN_COMPLETED):
                data["output"] = event.get("output")
            run_event = RunEvent(
                type=shown, service="workflow", node=event.get("step"), elapsed_ms=event.get("ms"), data=data
            )
            body = new_envelope_json(
                Kind.EVENT, state.tenant, run_event, run_id=state.run_id, principal=state.principal
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
        await self._index(state.finished or "finished")
        if state.timer:  # a timer left behind would only wake the finished run once more
            await self.store.cancel_timer(state.tenant, state.run_id)

    async def _index(self, status: str, **extra: Any) -> None:
        await self.store.index(self.state.tenant, self.state.run_id, summary(self.state, status, **extra))


class InvalidOutput(CorralError):
    """A step's output stayed outside its schema for its whole validation budget."""

    code = ErrorCode.INVALID_REQUEST


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
