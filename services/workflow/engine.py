"""The workflow engine's logic, without a broker: a run's history folded into its state, and what
the run does next.

A run is its history: a list of events (``run_started``, ``step_started``, ``step_completed``, ...)
that the service appends to JetStream one by one. :func:`apply` folds one event into a
:class:`RunState`; :func:`plan` reads the state and the definition and says what comes next:
decisions to record (a branch chosen, a wait begun, a timeout, the run's end), steps to run,
compensations to run, or the time the run must be woken. Recovery is the same fold: nothing of
the user's is replayed, so a changed definition or function cannot make an old run diverge; and a
run keeps the definition it started with (its snapshot is in ``run_started``).

A step whose outcome is recorded never runs again. A step that was started and has no outcome was
interrupted (its replica died): it runs again with the same idempotency key, and the interruptions
are bounded so a step that kills every replica fails the run instead of looping.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import jsonschema

from contracts.errors import ErrorCode
from contracts.expressions import compile_arguments, compile_expression, compile_path, compile_template, evaluate
from contracts.workflows import (
    LEAF_KINDS,
    BranchStep,
    Join,
    OnTimeout,
    ParallelStep,
    SleepStep,
    WaitStep,
    WorkflowDefinition,
)

# Attempts of one step cut short by a dying replica before the run gives the step up.
MAX_INTERRUPTIONS = 10
# Signals a run keeps for waits it has not reached yet.
MAX_BUFFERED_SIGNALS = 16


class Ev:
    """The history's event types."""

    RUN_STARTED = "run_started"
    STEP_STARTED = "step_started"
    STEP_COMPLETED = "step_completed"
    STEP_FAILED = "step_failed"
    BRANCH_CHOSEN = "branch_chosen"
    WAITING = "waiting"
    SIGNAL_RECEIVED = "signal_received"
    SIGNAL_BUFFERED = "signal_buffered"  # arrived before its wait: taken when the run gets there
    WAIT_TIMED_OUT = "wait_timed_out"
    SLEEPING = "sleeping"
    RUN_FAILING = "run_failing"  # the run failed; compensations follow
    CANCEL_REQUESTED = "cancel_requested"
    COMPENSATION_STARTED = "compensation_started"
    COMPENSATION_COMPLETED = "compensation_completed"
    COMPENSATION_FAILED = "compensation_failed"
    RUN_COMPLETED = "run_completed"
    RUN_FAILED = "run_failed"
    RUN_CANCELLED = "run_cancelled"


# Events only the replica driving the run writes (under its lease). Signals and cancellations are
# written by whichever replica takes them; finding one of these written by someone else means the
# lease was lost.
DRIVER_EVENTS = frozenset(
    {
        Ev.STEP_STARTED,
        Ev.STEP_COMPLETED,
        Ev.STEP_FAILED,
        Ev.BRANCH_CHOSEN,
        Ev.WAITING,
        Ev.WAIT_TIMED_OUT,
        Ev.SLEEPING,
        Ev.RUN_FAILING,
        Ev.COMPENSATION_STARTED,
        Ev.COMPENSATION_COMPLETED,
        Ev.COMPENSATION_FAILED,
        Ev.RUN_COMPLETED,
        Ev.RUN_FAILED,
        Ev.RUN_CANCELLED,
    }
)
FINISHED = {Ev.RUN_COMPLETED: "completed", Ev.RUN_FAILED: "failed", Ev.RUN_CANCELLED: "cancelled"}


@dataclass
class RunState:
    """Everything the history says about one run (JSON-able: it is also the run's snapshot)."""

    run_id: str
    tenant: str
    workflow: str
    digest: str
    definition: dict[str, Any]
    input: dict[str, Any]
    params: dict[str, Any]
    principal: str | None
    started_at: float
    outputs: dict[str, Any] = field(default_factory=dict)
    completed: list[str] = field(default_factory=list)  # completion order (compensations reverse it)
    attempts: dict[str, int] = field(default_factory=dict)  # attempts started
    failed: dict[str, int] = field(default_factory=dict)  # attempts that ended in a failure
    last_failure: dict[str, dict[str, Any]] = field(default_factory=dict)
    arms: dict[str, str] = field(default_factory=dict)  # branch -> "then" | "else"
    waits: dict[str, float] = field(default_factory=dict)  # wait step -> when it times out
    sleeps: dict[str, float] = field(default_factory=dict)  # sleep step -> when it ends
    approvals: dict[str, dict[str, Any]] = field(default_factory=dict)  # wait step -> who signalled
    buffered: list[dict[str, Any]] = field(default_factory=list)  # signals sent before their wait
    failure: dict[str, Any] | None = None  # why the run failed (then it compensates)
    cancel: dict[str, Any] | None = None  # who asked to cancel it
    compensated: list[str] = field(default_factory=list)
    compensation_attempts: dict[str, int] = field(default_factory=dict)
    compensation_failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    finished: str | None = None  # completed | failed | cancelled
    output: Any = None
    finished_at: float | None = None
    events: int = 0
    seq: int = 0  # the history's last sequence folded in
    timer: bool = False  # a broker timer was set for the run (purged when it finishes)
    trace: str | None = None  # the W3C traceparent of the start: its steps' calls carry it on
    correlation_id: str | None = None  # the start request's: every event and call of the run carries it
    # Whether its starter watches its progress (the start's ``stream``): each step's events are
    # published; without, only its outcomes (waiting, completed, failed, cancelled) are.
    progress: bool = True
    # Per list of steps (by its first step's name), how many of its steps are done (a cache).
    cursors: dict[str, int] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.finished:
            return self.finished
        if self.cancel is not None:
            return "cancelling"
        if self.failure is not None:
            return "compensating"
        return "running"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        return cls(**data)

    def scope(self) -> dict[str, Any]:
        """What expressions, templates and arguments read: the input, params, the run, the outputs."""
        return {**self.outputs, "input": self.input, "params": self.params, "run": {"id": self.run_id}}


def started(event: dict[str, Any], tenant: str, seq: int) -> RunState:
    """The state of a run from its first event."""
    return RunState(
        run_id=event["run_id"],
        tenant=tenant,
        workflow=event["workflow"],
        digest=event["digest"],
        definition=event["definition"],
        input=event["input"],
        params=event.get("params", {}),
        principal=event.get("principal"),
        started_at=event["at"],
        trace=event.get("trace"),
        correlation_id=event.get("correlation_id"),
        progress=event.get("stream", True),
        events=1,
        seq=seq,
    )


def apply(state: RunState, event: dict[str, Any], seq: int) -> None:
    """Fold one history event into the state."""
    kind = event["type"]
    step = event.get("step", "")
    state.events += 1
    state.seq = seq
    if kind == Ev.STEP_STARTED:
        state.attempts[step] = event["attempt"]
    elif kind == Ev.STEP_COMPLETED:
        if step not in state.outputs:
            state.completed.append(step)
        state.outputs[step] = event.get("output")
    elif kind == Ev.STEP_FAILED:
        state.failed[step] = state.failed.get(step, 0) + 1
        state.last_failure[step] = {k: event.get(k) for k in ("attempt", "code", "message", "retry_at", "final")}
    elif kind == Ev.BRANCH_CHOSEN:
        state.arms[step] = event["arm"]
    elif kind == Ev.WAITING:
        state.waits[step] = event["until"]
    elif kind == Ev.SIGNAL_BUFFERED:
        state.buffered.append({k: event.get(k) for k in ("signal", "by", "scope", "data", "at")})
    elif kind == Ev.SIGNAL_RECEIVED:
        if event.get("buffered") is not None:  # taken from the buffer: it leaves it
            state.buffered.pop(event["buffered"])
        approval = {"by": event.get("by"), "scope": event.get("scope"), "at": event.get("at")}
        state.approvals[step] = approval
        if step not in state.outputs:
            state.completed.append(step)
        state.outputs[step] = {"data": event.get("data"), **approval}
    elif kind == Ev.WAIT_TIMED_OUT:
        if event.get("continue"):
            state.completed.append(step)
            state.outputs[step] = None
        else:
            state.failed[step] = state.failed.get(step, 0) + 1
            message = f"no signal {event.get('signal')!r} arrived before the wait timed out"
            state.last_failure[step] = {"code": ErrorCode.DEADLINE_EXCEEDED.value, "message": message, "final": True}
    elif kind == Ev.SLEEPING:
        state.sleeps[step] = event["until"]
    elif kind == Ev.RUN_FAILING:
        state.failure = {k: event.get(k) for k in ("step", "code", "message")}
    elif kind == Ev.CANCEL_REQUESTED:
        if state.cancel is None:
            state.cancel = {"by": event.get("by"), "at": event.get("at")}
    elif kind == Ev.COMPENSATION_STARTED:
        state.compensation_attempts[step] = event["attempt"]
    elif kind == Ev.COMPENSATION_COMPLETED:
        state.compensated.append(step)
    elif kind == Ev.COMPENSATION_FAILED:
        state.compensation_failures[step] = {k: event.get(k) for k in ("attempt", "code", "message", "retry_at")}
        if event.get("final"):
            state.compensated.append(step)  # given up: the next compensation goes on
    elif kind in FINISHED:
        state.finished = FINISHED[kind]
        state.output = event.get("output")
        state.finished_at = event.get("at")
        if kind == Ev.RUN_FAILED and state.failure is None:
            state.failure = {k: event.get(k) for k in ("step", "code", "message")}


# ---- the compiled definition ---------------------------------------------------------------


class CompiledWorkflow:
    """A definition with its paths, templates, conditions and schemas parsed once."""

    def __init__(self, definition: WorkflowDefinition) -> None:
        self.definition = definition
        self.digest = definition.digest()
        # What a run's ``run_started`` keeps of it (read, never changed: shared by every run).
        self.snapshot = definition.model_dump(mode="json", by_alias=True)
        self.steps = {step.name: step for step in definition.walk()}
        self.arguments: dict[str, Any] = {}
        self.templates: dict[str, tuple[Any, Any]] = {}
        self.conditions: dict[str, Any] = {}
        self.schemas: dict[str, Any] = {}
        self.compensations: dict[str, Any] = {}
        for name, step in self.steps.items():
            for key in ("args", "input"):
                if hasattr(step, key):
                    self.arguments[name] = compile_arguments(getattr(step, key))
            if hasattr(step, "prompt"):
                system = compile_template(step.system) if step.system else None
                self.templates[name] = (system, compile_template(step.prompt))
            if isinstance(step, BranchStep):
                self.conditions[name] = compile_expression(step.condition)
            schema = getattr(step, "output_schema", None)
            if schema is not None:
                self.schemas[name] = jsonschema.validators.validator_for(schema)(schema)
            if step.compensate is not None:
                self.compensations[name] = compile_arguments(step.compensate.args)
        self.output = compile_path(definition.output) if definition.output else None

    def final_output(self, state: RunState, last: Any) -> Any:
        return self.output(state.scope()) if self.output is not None else last


# ---- what comes next -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunStep:
    """Run one attempt of a leaf step (tool, model, graph, function)."""

    step: str
    attempt: int


@dataclass(frozen=True)
class RunCompensation:
    step: str
    attempt: int


@dataclass
class Plan:
    """What a run does next. ``records``: decisions to append now, before anything else.
    ``runs``: steps (or compensations) to start. ``until``: when the run must be woken if nothing
    else happens (a wait's timeout, a sleep's end, a retry's backoff). ``finished``: it is over."""

    records: list[dict[str, Any]] = field(default_factory=list)
    runs: list[RunStep | RunCompensation] = field(default_factory=list)
    until: float | None = None
    waiting_for: list[str] = field(default_factory=list)  # the signals it waits for
    finished: bool = False

    def later(self, until: float | None) -> None:
        if until is not None and (self.until is None or until < self.until):
            self.until = until


@dataclass
class _Done:
    output: Any


@dataclass
class _Failed:
    step: str
    code: str
    message: str


def plan(
    state: RunState, workflow: CompiledWorkflow, now: float | None = None, running: frozenset[str] = frozenset()
) -> Plan:
    """What the run does next, given its state and the steps already running in this replica."""
    now = time.time() if now is None else now
    result = Plan()
    if state.finished:
        result.finished = True
        return result
    if state.failure is None and state.cancel is None:
        outcome = _sequence(workflow.definition.steps, state, workflow, now, running, result)
        if isinstance(outcome, _Done):
            if not result.records and not result.runs:
                output = workflow.final_output(state, outcome.output)
                result.records.append({"type": Ev.RUN_COMPLETED, "output": output})
            return result
        if isinstance(outcome, _Failed):
            result.records = [
                {"type": Ev.RUN_FAILING, "step": outcome.step, "code": outcome.code, "message": outcome.message}
            ]
            result.runs, result.until, result.waiting_for = [], None, []
            return result
        return result
    # Failed or cancelled: once nothing runs any more, the completed steps' compensations run in
    # reverse order of completion, then the run ends.
    if running:
        return result
    for step in reversed(state.completed):
        if workflow.steps[step].compensate is None or step in state.compensated:
            continue
        failure = state.compensation_failures.get(step)
        attempt = state.compensation_attempts.get(step, 0)
        if (
            failure is not None
            and failure.get("retry_at")
            and failure["retry_at"] > now
            and failure["attempt"] == attempt
        ):
            result.later(failure["retry_at"])
            return result
        result.runs.append(RunCompensation(step, attempt + 1))
        return result
    if state.cancel is not None:
        result.records.append({"type": Ev.RUN_CANCELLED, "by": state.cancel.get("by")})
    else:
        failure = state.failure or {}
        result.records.append({"type": Ev.RUN_FAILED, **failure})
    return result


def _sequence(
    steps: list[Any], state: RunState, wf: CompiledWorkflow, now: float, running: frozenset[str], out: Plan
) -> Any:
    """A list of steps: done when every step is, else whatever its first unfinished step needs.

    Where the list's completed prefix ends is kept in the state (outputs are never taken back):
    planning a long run does not walk every finished step again at each step."""
    key = steps[0].name if steps else ""
    start = state.cursors.get(key, 0)
    last: Any = state.outputs.get(steps[start - 1].name) if start else None
    for index in range(start, len(steps)):
        outcome = _step(steps[index], state, wf, now, running, out)
        if not isinstance(outcome, _Done):
            return outcome
        last = outcome.output
        if steps[index].name in state.outputs:
            state.cursors[key] = index + 1
    return _Done(last)


def _step(step: Any, state: RunState, wf: CompiledWorkflow, now: float, running: frozenset[str], out: Plan) -> Any:
    name = step.name
    if name in state.outputs:
        return _Done(state.outputs[name])
    failure = state.last_failure.get(name)
    if failure is not None and failure.get("final"):
        return _Failed(name, failure["code"], failure["message"])
    if isinstance(step, BranchStep):
        arm = state.arms.get(name)
        if arm is None:
            chosen = "then" if evaluate(wf.conditions[name], state.scope()) else "else"
            out.records.append({"type": Ev.BRANCH_CHOSEN, "step": name, "arm": chosen})
            return None
        outcome = _sequence(step.then if arm == "then" else step.otherwise, state, wf, now, running, out)
        if isinstance(outcome, _Done):
            out.records.append({"type": Ev.STEP_COMPLETED, "step": name, "output": outcome.output})
            return None
        return outcome
    if isinstance(step, ParallelStep):
        return _parallel(step, state, wf, now, running, out)
    if isinstance(step, WaitStep):
        kept = buffered_for(state, step)
        if kept is not None:  # its signal came before the run got here
            signal = state.buffered[kept]
            out.records.append(
                {
                    "type": Ev.SIGNAL_RECEIVED,
                    "step": name,
                    **{k: signal.get(k) for k in ("signal", "by", "scope", "data")},
                    "buffered": kept,
                    "signalled_at": signal.get("at"),
                }
            )
            return None
        until = state.waits.get(name)
        if until is None:
            out.records.append({"type": Ev.WAITING, "step": name, "signal": step.signal, "until": now + step.timeout_s})
            return None
        if now >= until:
            timed_out = {"type": Ev.WAIT_TIMED_OUT, "step": name, "signal": step.signal}
            out.records.append({**timed_out, "continue": step.on_timeout is OnTimeout.CONTINUE})
            return None
        out.later(until)
        out.waiting_for.append(step.signal)
        return None
    if isinstance(step, SleepStep):
        until = state.sleeps.get(name)
        if until is None:
            out.records.append({"type": Ev.SLEEPING, "step": name, "until": now + step.seconds})
        elif now >= until:
            out.records.append({"type": Ev.STEP_COMPLETED, "step": name, "output": None})
        else:
            out.later(until)
        return None
    assert isinstance(step, LEAF_KINDS)
    if name in running:
        return None
    attempts = state.attempts.get(name, 0)
    failed = state.failed.get(name, 0)
    if failure is not None and failure.get("attempt") == attempts and (failure.get("retry_at") or 0) > now:
        out.later(failure["retry_at"])  # backing off before the next attempt
        return None
    if attempts - failed >= MAX_INTERRUPTIONS:
        message = f"step {name!r} was interrupted {attempts - failed} times (its replica stopped each time)"
        out.records.append(
            {
                "type": Ev.STEP_FAILED,
                "step": name,
                "attempt": attempts,
                "code": ErrorCode.UNAVAILABLE.value,
                "message": message,
                "final": True,
            }
        )
        return None
    out.runs.append(RunStep(name, attempts + 1))
    return None


def _parallel(
    step: ParallelStep, state: RunState, wf: CompiledWorkflow, now: float, running: frozenset[str], out: Plan
) -> Any:
    outcomes = {branch: _sequence(steps, state, wf, now, running, out) for branch, steps in step.branches.items()}
    done = {branch: o.output for branch, o in outcomes.items() if isinstance(o, _Done)}
    failures = [o for o in outcomes.values() if isinstance(o, _Failed)]
    if step.join is Join.ANY:
        if done:
            first = next(iter(done))
            _only(out, {"type": Ev.STEP_COMPLETED, "step": step.name, "output": {first: done[first]}, "joined": first})
            return None
        if len(failures) == len(outcomes):
            return failures[0]
        return None
    if failures:
        return failures[0]
    if len(done) == len(outcomes):
        out.records.append({"type": Ev.STEP_COMPLETED, "step": step.name, "output": done})
    return None


def _only(out: Plan, record: dict[str, Any]) -> None:
    """The any-join: the first branch to finish settles the step; the others' plans are dropped."""
    out.records.append(record)
    out.runs.clear()
    out.until = None
    out.waiting_for.clear()


def step_failure(
    state: RunState,
    workflow: CompiledWorkflow,
    step: str,
    attempt: int,
    code: str,
    message: str,
    now: float | None = None,
    *,
    compensation: bool = False,
) -> dict[str, Any]:
    """The ``step_failed`` event of an attempt that ended with ``code``: retried after its
    policy's backoff if the policy retries the code and attempts are left, else final.

    ``compensation``: the ``compensation_failed`` event of a compensation instead, retried under
    its step's policy whatever the code (undoing must be tried hard), then given up (the next
    compensation goes on)."""
    now = time.time() if now is None else now
    policy = workflow.steps[step].retry
    if compensation:
        kind, failed, retried = Ev.COMPENSATION_FAILED, attempt, attempt < policy.max_attempts
    else:
        failed = state.failed.get(step, 0) + 1
        kind, retried = Ev.STEP_FAILED, policy.retries(code, failed)
    event: dict[str, Any] = {"type": kind, "step": step, "attempt": attempt, "code": code, "message": message}
    if retried:
        event["retry_at"] = now + policy.delay_s(failed)
    event["final"] = not retried
    return event


def buffered_for(state: RunState, step: WaitStep) -> int | None:
    """The position in the buffer of the first signal sent early that ``step`` takes (its name,
    and the step's scope if it needs one)."""
    for index, signal in enumerate(state.buffered):
        if signal["signal"] == step.signal and (step.scope is None or signal.get("scope") == step.scope):
            return index
    return None


def later_waits(state: RunState, workflow: CompiledWorkflow, signal: str) -> list[WaitStep]:
    """The wait steps for ``signal`` the run has not reached yet and still may (not in a branch
    arm it did not take, nor in a step already done)."""
    return [
        step
        for step in _ahead(workflow.definition.steps, state)
        if isinstance(step, WaitStep)
        and step.signal == signal
        and step.name not in state.waits
        and not state.last_failure.get(step.name, {}).get("final")
    ]


def _ahead(steps: list[Any], state: RunState) -> Any:
    for step in steps:
        if step.name in state.outputs:
            continue
        yield step
        if isinstance(step, BranchStep):
            arm = state.arms.get(step.name)
            if arm != "else":
                yield from _ahead(step.then, state)
            if arm != "then":
                yield from _ahead(step.otherwise, state)
        elif isinstance(step, ParallelStep):
            for branch in step.branches.values():
                yield from _ahead(branch, state)


def waiting_step(state: RunState, workflow: CompiledWorkflow, signal: str) -> WaitStep | None:
    """The wait step now waiting for ``signal``, if any."""
    for name in state.waits:
        step = workflow.steps.get(name)
        if isinstance(step, WaitStep) and step.signal == signal and name not in state.outputs:
            if state.last_failure.get(name, {}).get("final"):
                continue
            return step
    return None
