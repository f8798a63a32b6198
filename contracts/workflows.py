"""Workflow definitions: durable steps run in order, with retries, validation, timers, approvals.

A workflow is a list of steps. Each step has a name (unique in the workflow: the run state keeps
its output under it, the history records it, the idempotency key is derived from it) and a kind:

- ``tool``: call a tool over the bus (tenant injected by the tools service, key passed on);
- ``model``: ask a model, with an output schema it must answer (re-asked on a bad answer);
- ``graph``: run a declared graph as one step;
- ``function``: an operator-supplied Python function ``module:function``;
- ``wait``: wait for a signal (an approval), with a timeout, optionally from a holder of a scope;
- ``sleep``: a durable timer;
- ``branch``: ``if`` an expression over the run state, the ``then`` steps, else the ``else`` steps;
- ``parallel``: several lists of steps at once, joined when ``all`` (or ``any``) finished.

Any step that has a side effect may declare ``compensate`` (a tool call): when the run fails, the
compensations of the steps that completed run in reverse order (a saga).

Nothing here is replayed: the engine records each step's outcome and moves on, so a definition is
data, not code with determinism rules. A run keeps the definition it started with.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import ConfigDict, Field, JsonValue, field_validator, model_validator

from contracts.definitions_base import Definition
from contracts.errors import ErrorCode
from contracts.expressions import ExpressionError, compile_expression, names_in, placeholders
from contracts.graphs import CALLABLE_PATTERN
from contracts.tenants import Name

# Names the run state uses for itself: a step may not take them.
RESERVED_STEP_NAMES = frozenset({"input", "params", "run", "end", "cancel"})
# The signal name that cancels a run (never a wait step's signal).
CANCEL_SIGNAL = "cancel"
MAX_STEPS = 20_000
WEEK_S = 7 * 86_400


class StepKind(StrEnum):
    TOOL = "tool"
    MODEL = "model"
    GRAPH = "graph"
    FUNCTION = "function"
    WAIT = "wait"
    SLEEP = "sleep"
    BRANCH = "branch"
    PARALLEL = "parallel"


# Errors worth another attempt by default: the call may succeed next time. A refusal
# (forbidden, not found, an invalid request) fails the same way again and is not retried.
DEFAULT_RETRY_ON = (
    ErrorCode.TOOL_FAILED,
    ErrorCode.DEADLINE_EXCEEDED,
    ErrorCode.UNAVAILABLE,
    ErrorCode.RATE_LIMITED,
    ErrorCode.INTERNAL,
)


class RetryPolicy(Definition):
    """How a failed attempt is retried: exponential backoff, capped, for the listed error codes."""

    initial_interval_s: float = Field(default=0.2, gt=0, le=3600)
    backoff: float = Field(default=2.0, ge=1, le=10)
    max_interval_s: float = Field(default=30.0, gt=0, le=86_400)
    max_attempts: int = Field(default=3, ge=1, le=1000)
    retry_on: list[ErrorCode] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON))

    def delay_s(self, attempt: int) -> float:
        """The wait before attempt ``attempt + 1``, after ``attempt`` (1-based) failed."""
        return min(self.max_interval_s, self.initial_interval_s * self.backoff ** max(0, attempt - 1))

    def retries(self, code: str, attempt: int) -> bool:
        return attempt < self.max_attempts and code in self.retry_on


class Compensation(Definition):
    """The tool call that undoes a completed step; ``args`` may read the run state (``$step.x``)."""

    tool: Name
    args: dict[str, JsonValue] = Field(default_factory=dict)


class _Step(Definition):
    name: Name
    description: str = ""
    # The time one attempt may take.
    timeout_s: float = Field(default=30.0, gt=0, le=86_400)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    compensate: Compensation | None = None


class _Validated(_Step):
    # A JSON schema the step's output must match; an output outside it is tried again up to
    # ``validation_attempts`` times, a budget of its own (a model is re-asked, told what was wrong).
    output_schema: dict[str, Any] | None = None
    validation_attempts: int = Field(default=3, ge=1, le=20)

    @field_validator("output_schema")
    @classmethod
    def _schema_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                jsonschema.validators.validator_for(value).check_schema(value)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"output_schema is not a valid JSON schema: {exc.message}") from None
        return value


class ToolStep(_Validated):
    """Calls a tool; argument values starting with ``$`` read the run state (``$input.order_id``)."""

    kind: Literal[StepKind.TOOL] = StepKind.TOOL
    tool: Name
    args: dict[str, JsonValue] = Field(default_factory=dict)


class ModelStep(_Validated):
    """Asks a model; ``prompt`` and ``system`` are templates with ``{path}`` placeholders."""

    kind: Literal[StepKind.MODEL] = StepKind.MODEL
    model: Name | None = None  # None: the workflow's model
    system: str | None = None
    prompt: str


class GraphStep(_Validated):
    """Runs a declared graph over the bus with ``input`` (resolved from the run state)."""

    kind: Literal[StepKind.GRAPH] = StepKind.GRAPH
    graph: Name
    input: dict[str, JsonValue] = Field(default_factory=dict)


class FunctionStep(_Validated):
    """An operator-supplied Python function ``module:function``, called with the resolved args."""

    kind: Literal[StepKind.FUNCTION] = StepKind.FUNCTION
    callable: str = Field(pattern=CALLABLE_PATTERN)
    args: dict[str, JsonValue] = Field(default_factory=dict)


class OnTimeout(StrEnum):
    FAIL = "fail"  # the run fails (and compensates)
    CONTINUE = "continue"  # the step's output is null and the run goes on


class WaitStep(_Step):
    """Waits for ``signal`` on the run; its output is the signal's data and who sent it.

    ``scope``: only a sender whose verified token holds this scope (or role) may send it; anyone
    else is refused with a typed error and the run is unchanged.
    """

    kind: Literal[StepKind.WAIT] = StepKind.WAIT
    signal: Name
    scope: str | None = Field(default=None, min_length=1, max_length=128)
    timeout_s: float = Field(default=WEEK_S, gt=0, le=365 * 86_400)
    on_timeout: OnTimeout = OnTimeout.FAIL

    @field_validator("signal")
    @classmethod
    def _not_cancel(cls, value: str) -> str:
        if value == CANCEL_SIGNAL:
            raise ValueError(f"'{CANCEL_SIGNAL}' is the signal that cancels a run")
        return value


class SleepStep(_Step):
    """A durable timer: the run goes on ``seconds`` after the step starts, across restarts."""

    kind: Literal[StepKind.SLEEP] = StepKind.SLEEP
    seconds: float = Field(gt=0, le=365 * 86_400)


class BranchStep(_Step):
    """``then`` if the expression holds over the run state, else ``else``; the chosen list's last
    output is the step's output."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    kind: Literal[StepKind.BRANCH] = StepKind.BRANCH
    condition: str = Field(alias="if")
    then: list[Step] = Field(default_factory=list)
    otherwise: list[Step] = Field(default_factory=list, alias="else")

    @field_validator("condition")
    @classmethod
    def _parses(cls, value: str) -> str:
        try:
            compile_expression(value)
        except ExpressionError as exc:
            raise ValueError(exc.message) from None
        return value


class Join(StrEnum):
    ALL = "all"  # every branch finished; the output maps each branch to its last output
    ANY = "any"  # the first branch to finish; the others are not continued


class ParallelStep(_Step):
    kind: Literal[StepKind.PARALLEL] = StepKind.PARALLEL
    branches: dict[Name, list[Step]] = Field(min_length=2)
    join: Join = Join.ALL


Step = Annotated[
    ToolStep | ModelStep | GraphStep | FunctionStep | WaitStep | SleepStep | BranchStep | ParallelStep,
    Field(discriminator="kind"),
]
LEAF_KINDS = (ToolStep, ModelStep, GraphStep, FunctionStep)


class WorkflowDefinition(Definition):
    name: Name
    description: str = ""
    # A JSON schema of the input; a start whose input does not match is refused.
    input_schema: dict[str, Any] | None = None
    steps: list[Step] = Field(min_length=1)
    # A path into the final state (``refund.id``); default: the last step's output.
    output: str | None = None
    model: Name | None = None  # default model of the model steps
    # A scope a principal must hold to cancel a run (default: any user of the tenant).
    cancel_scope: str | None = Field(default=None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _well_formed(self) -> WorkflowDefinition:
        problems = _problems(self)
        if problems:
            raise ValueError(f"workflow {self.name!r}: " + "; ".join(problems))
        return self

    def walk(self) -> list[Any]:
        """Every step, depth first in declaration order."""
        return list(_walk(self.steps))

    def tools(self) -> set[str]:
        found = {step.tool for step in self.walk() if isinstance(step, ToolStep)}
        return found | {step.compensate.tool for step in self.walk() if step.compensate is not None}

    def graphs(self) -> set[str]:
        return {step.graph for step in self.walk() if isinstance(step, GraphStep)}

    def models(self) -> set[str]:
        return {name for step in self.walk() if isinstance(step, ModelStep) and (name := step.model or self.model)}

    def digest(self) -> str:
        """A hash of the definition as data: what a run is pinned to."""
        text = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _walk(steps: list[Any]) -> Any:
    for step in steps:
        yield step
        if isinstance(step, BranchStep):
            yield from _walk(step.then)
            yield from _walk(step.otherwise)
        elif isinstance(step, ParallelStep):
            for branch in step.branches.values():
                yield from _walk(branch)


def _problems(workflow: WorkflowDefinition) -> list[str]:
    problems: list[str] = []
    steps = workflow.walk()
    if len(steps) > MAX_STEPS:
        problems.append(f"{len(steps)} steps is more than {MAX_STEPS}")
    seen: set[str] = set()
    for step in steps:
        if step.name in RESERVED_STEP_NAMES:
            problems.append(f"step name {step.name!r} is reserved ({', '.join(sorted(RESERVED_STEP_NAMES))})")
        if step.name in seen:
            problems.append(f"step name {step.name!r} is used twice")
        seen.add(step.name)
        if isinstance(step, ModelStep) and step.model is None and workflow.model is None:
            problems.append(f"model step {step.name!r} names no model and the workflow has no default model")
    # References into the run state must name the input, the params or a step declared before.
    known = {"input", "params", "run"}
    for step in steps:
        for reference in _references(step):
            if reference not in known:
                problems.append(
                    f"step {step.name!r} reads {reference!r}, which is neither input, params "
                    "nor a step declared before it"
                )
        known.add(step.name)
        if step.compensate is not None:  # a compensation runs after its step: it may read its output
            for reference in _references_of_args(step.compensate.args) - known:
                problems.append(f"the compensation of step {step.name!r} reads {reference!r}, not a step before it")
    if workflow.output is not None and workflow.output.split(".")[0] not in known:
        problems.append(f"output {workflow.output!r} does not start with a step name, input or params")
    return problems


def _references_of_args(value: Any) -> set[str]:
    """The first path token of every ``$path`` in an argument template."""
    if isinstance(value, str) and value.startswith("$") and len(value) > 1:
        return {value[1:].split(".")[0]}
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return set().union(*(_references_of_args(item) for item in value))
    return set()


def _references(step: Any) -> set[str]:
    """The first path token of every state reference a step makes (args, templates, condition)."""
    found: set[str] = set()
    for field in ("args", "input"):
        found |= _references_of_args(getattr(step, field, None))
    for field in ("prompt", "system"):
        text = getattr(step, field, None)
        if isinstance(text, str):
            found.update(path.split(".")[0] for path in placeholders(text))
    if isinstance(step, BranchStep):
        found.update(names_in(step.condition))
    return found


BranchStep.model_rebuild()
ParallelStep.model_rebuild()
