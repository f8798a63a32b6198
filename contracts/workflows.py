"""Workflow definitions: durable steps run in order, with retries, validation, timers, approvals.

A workflow is a list of steps. Each step has a name (unique in the workflow: the run state keeps
its output under it, the history records it, the idempotency key is derived from it) and a kind:

- ``tool``: call a tool over the bus (tenant injected by the tools service, key passed on), or
  with ``local`` in the workflow replica itself, through the same checked call path;
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

from pydantic import ConfigDict, Field, JsonValue, field_validator, model_validator

from contracts.definitions_base import Definition, Location, Problem, Problems, did_you_mean
from contracts.errors import ErrorCode
from contracts.expressions import ExpressionError, compile_expression
from contracts.graphs import CALLABLE_PATTERN, valid_schema
from contracts.references import (
    Reference,
    argument_references,
    argument_slips,
    condition_references,
    input_field_problem,
    template_references,
    template_slips,
)
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

    initial_interval_s: float = Field(default=0.2, gt=0, le=3600, description="Seconds before the second attempt.")
    backoff: float = Field(default=2.0, ge=1, le=10, description="Each wait is this many times the one before.")
    max_interval_s: float = Field(default=30.0, gt=0, le=86_400, description="The longest wait.")
    max_attempts: int = Field(default=3, ge=1, le=1000, description="Attempts in all, the first included.")
    retry_on: list[ErrorCode] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_ON), description="The error codes worth another attempt."
    )

    def delay_s(self, attempt: int) -> float:
        """The wait before attempt ``attempt + 1``, after ``attempt`` (1-based) failed."""
        return min(self.max_interval_s, self.initial_interval_s * self.backoff ** max(0, attempt - 1))

    def retries(self, code: str, attempt: int) -> bool:
        return attempt < self.max_attempts and code in self.retry_on


class Compensation(Definition):
    """The tool call that undoes a completed step; ``args`` may read the run state (``$step.x``)."""

    tool: Name = Field(description="The tool that undoes the step.")
    args: dict[str, JsonValue] = Field(default_factory=dict, description="Its arguments; `$path` reads the state.")


class _Step(Definition):
    name: Name = Field(description="Unique in the workflow: the run state keeps the step's output under it.")
    description: str = ""
    timeout_s: float = Field(default=30.0, gt=0, le=86_400, description="Seconds one attempt may take.")
    retry: RetryPolicy = Field(default_factory=RetryPolicy, description="How a failed attempt is tried again.")
    compensate: Compensation | None = Field(
        default=None, description="The tool call that undoes the step when the run fails later (a saga)."
    )


class _Validated(_Step):
    # A JSON schema the step's output must match; an output outside it is tried again up to
    # ``validation_attempts`` times, a budget of its own (a model is re-asked, told what was wrong).
    output_schema: dict[str, Any] | None = Field(
        default=None, description="A JSON schema the output must match (a model is asked again, told why)."
    )
    validation_attempts: int = Field(
        default=3, ge=1, le=20, description="Outputs outside `output_schema` tried before the step fails."
    )

    @field_validator("output_schema")
    @classmethod
    def _schema_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return valid_schema(value, "output_schema")


class ToolStep(_Validated):
    """Calls a tool; argument values starting with ``$`` read the run state (``$input.order_id``)."""

    kind: Literal[StepKind.TOOL] = StepKind.TOOL
    tool: Name = Field(description="The tool to call (the tenant must be allowed it).")
    args: dict[str, JsonValue] = Field(
        default_factory=dict, description="The call's arguments; a string `$path` reads the state (`$input.order_id`)."
    )
    local: bool = Field(
        default=False,
        description="Call the tool in the workflow replica rather than through the tools service (a Python or "
        "HTTP tool): the same checks, context and audit, one round trip between processes less per step.",
    )


class ModelStep(_Validated):
    """Asks a model; ``prompt`` and ``system`` are templates with ``{path}`` placeholders."""

    kind: Literal[StepKind.MODEL] = StepKind.MODEL
    model: Name | None = Field(default=None, description="The model to ask (default: the workflow's `model`).")
    system: str | None = Field(default=None, description="The system message: a template.")
    prompt: str = Field(description="The user message: a template with `{path}` placeholders.")


class GraphStep(_Validated):
    """Runs a declared graph over the bus with ``input`` (resolved from the run state)."""

    kind: Literal[StepKind.GRAPH] = StepKind.GRAPH
    graph: Name = Field(description="The graph to run.")
    input: dict[str, JsonValue] = Field(default_factory=dict, description="Its input; `$path` reads the state.")


class FunctionStep(_Validated):
    """An operator-supplied Python function ``module:function``, called with the resolved args."""

    kind: Literal[StepKind.FUNCTION] = StepKind.FUNCTION
    callable: str = Field(
        pattern=CALLABLE_PATTERN, description="`module:function`, importable by the workflow service."
    )
    args: dict[str, JsonValue] = Field(default_factory=dict, description="Keyword arguments; `$path` reads the state.")


class OnTimeout(StrEnum):
    FAIL = "fail"  # the run fails (and compensates)
    CONTINUE = "continue"  # the step's output is null and the run goes on


class WaitStep(_Step):
    """Waits for ``signal`` on the run; its output is the signal's data and who sent it.

    ``scope``: only a sender whose verified token holds this scope (or role) may send it; anyone
    else is refused with a typed error and the run is unchanged.
    """

    kind: Literal[StepKind.WAIT] = StepKind.WAIT
    signal: Name = Field(description="The signal to wait for (`corral workflow signal RUN approve`).")
    scope: str | None = Field(
        default=None, min_length=1, max_length=128, description="A scope the sender's token must hold."
    )
    timeout_s: float = Field(default=WEEK_S, gt=0, le=365 * 86_400, description="Seconds to wait.")
    on_timeout: OnTimeout = Field(
        default=OnTimeout.FAIL, description="`fail` the run, or `continue` with a null output."
    )

    @field_validator("signal")
    @classmethod
    def _not_cancel(cls, value: str) -> str:
        if value == CANCEL_SIGNAL:
            raise ValueError(f"'{CANCEL_SIGNAL}' is the signal that cancels a run")
        return value


class SleepStep(_Step):
    """A durable timer: the run goes on ``seconds`` after the step starts, across restarts."""

    kind: Literal[StepKind.SLEEP] = StepKind.SLEEP
    seconds: float = Field(gt=0, le=365 * 86_400, description="Seconds to wait, kept across restarts.")


class BranchStep(_Step):
    """``then`` if the expression holds over the run state, else ``else``; the chosen list's last
    output is the step's output."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    kind: Literal[StepKind.BRANCH] = StepKind.BRANCH
    condition: str = Field(alias="if", description="A condition over the state (`check.eligible == true`).")
    then: list[Step] = Field(default_factory=list, description="The steps run when it holds.")
    otherwise: list[Step] = Field(default_factory=list, alias="else", description="The steps run when it does not.")

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
    branches: dict[Name, list[Step]] = Field(min_length=2, description="Lists of steps run at once, by name.")
    join: Join = Field(default=Join.ALL, description="Go on when `all` branches finished, or `any` first.")


Step = Annotated[
    ToolStep | ModelStep | GraphStep | FunctionStep | WaitStep | SleepStep | BranchStep | ParallelStep,
    Field(discriminator="kind"),
]
LEAF_KINDS = (ToolStep, ModelStep, GraphStep, FunctionStep)


class WorkflowDefinition(Definition):
    """Durable steps run in order; the run state holds ``input``, ``params`` and each step's output."""

    name: Name
    description: str = ""
    input_schema: dict[str, Any] | None = Field(
        default=None,
        description="A JSON schema of the input: a start outside it is refused, and steps may read only the "
        "fields it declares.",
    )
    steps: list[Step] = Field(min_length=1, description="The steps, run in order; each has a `kind`.")
    output: str | None = Field(
        default=None, description="A path into the final state (`refund.id`; default: the last step's output)."
    )
    model: Name | None = Field(default=None, description="The model of model steps that name none.")
    cancel_scope: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="A scope a principal must hold to cancel a run (default: any user of the tenant).",
    )

    @field_validator("input_schema")
    @classmethod
    def _schema_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return valid_schema(value, "input_schema")

    @model_validator(mode="after")
    def _well_formed(self) -> WorkflowDefinition:
        problems = _problems(self)
        if problems:
            raise Problems(f"workflow {self.name!r}", problems)
        return self

    def walk(self) -> list[Any]:
        """Every step, depth first in declaration order."""
        return [step for _, step in _walk(self.steps)]

    def located(self) -> list[tuple[Location, Any]]:
        """Every step with where it is in the definition (``steps, 2, then, 0``), depth first."""
        return list(_walk(self.steps))

    def uses(self) -> list[tuple[str, str, Location]]:
        """Every tool, graph and model the workflow names: (what, name, where in the workflow)."""
        found: list[tuple[str, str, Location]] = []
        for where, step in self.located():
            if isinstance(step, ToolStep):
                found.append(("tool", step.tool, (*where, "tool")))
            if isinstance(step, GraphStep):
                found.append(("graph", step.graph, (*where, "graph")))
            if isinstance(step, ModelStep):
                if step.model is not None:
                    found.append(("model", step.model, (*where, "model")))
                elif self.model is not None:
                    found.append(("model", self.model, ("model",)))
            if step.compensate is not None:
                found.append(("tool", step.compensate.tool, (*where, "compensate", "tool")))
        return found

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


def _walk(steps: list[Any], where: Location = ("steps",)) -> Any:
    for index, step in enumerate(steps):
        here = (*where, index)
        yield here, step
        if isinstance(step, BranchStep):
            yield from _walk(step.then, (*here, "then"))
            yield from _walk(step.otherwise, (*here, "else"))
        elif isinstance(step, ParallelStep):
            for name, branch in step.branches.items():
                yield from _walk(branch, (*here, "branches", name))


def _problems(workflow: WorkflowDefinition) -> list[Problem]:
    problems: list[Problem] = []
    steps = workflow.located()
    if len(steps) > MAX_STEPS:
        problems.append(Problem(("steps",), f"{len(steps)} steps is more than {MAX_STEPS}"))
    seen: set[str] = set()
    for where, step in steps:
        if step.name in RESERVED_STEP_NAMES:
            message = f"step name {step.name!r} is reserved ({', '.join(sorted(RESERVED_STEP_NAMES))})"
            problems.append(Problem((*where, "name"), message))
        if step.name in seen:
            problems.append(Problem((*where, "name"), f"step name {step.name!r} is used twice"))
        seen.add(step.name)
        if isinstance(step, ModelStep) and step.model is None and workflow.model is None:
            message = f"model step {step.name!r} names no model and the workflow has no default model"
            problems.append(Problem(where, message))
    # References into the run state must name the input, the params or a step declared before.
    names = {"input", "params", "run", *seen}
    known = {"input", "params", "run"}

    def check(reference: Reference, known: set[str], message: str) -> None:
        if reference.name == "input":
            found = input_field_problem(reference, workflow.input_schema)
            if found is not None:
                problems.append(found)
        elif reference.name not in known:
            hint = did_you_mean(reference.name, known - {"run"})
            problems.append(Problem(reference.where, message.format(name=reference.name) + hint))

    for where, step in steps:
        problems += _slips(step, where, names)
        for reference in _references(step, where):
            check(
                reference,
                known,
                f"step {step.name!r} reads {{name!r}}, which is neither input, params nor a step declared before it",
            )
        known.add(step.name)
        if step.compensate is not None:  # a compensation runs after its step: it may read its output
            for reference in argument_references(step.compensate.args, (*where, "compensate", "args")):
                check(
                    reference, known, f"the compensation of step {step.name!r} reads {{name!r}}, not a step before it"
                )
    if workflow.output is not None and workflow.output.split(".")[0] not in known:
        message = f"output {workflow.output!r} does not start with a step name, input or params"
        problems.append(Problem(("output",), message + did_you_mean(workflow.output.split(".")[0], known - {"run"})))
    return problems


def _references(step: Any, where: Location) -> list[Reference]:
    """Every state reference a step makes (args, input, templates, condition), with where it is."""
    found: list[Reference] = []
    for field in ("args", "input"):
        found += argument_references(getattr(step, field, None), (*where, field))
    for field in ("prompt", "system"):
        found += template_references(getattr(step, field, None), (*where, field))
    if isinstance(step, BranchStep):
        found += condition_references(step.condition, (*where, "if"))
    return found


def _slips(step: Any, where: Location, names: set[str]) -> list[Problem]:
    found: list[Problem] = []
    for field in ("args", "input"):
        found += argument_slips(getattr(step, field, None), (*where, field), names)
    for field in ("prompt", "system"):
        found += template_slips(getattr(step, field, None), (*where, field), names)
    return found


BranchStep.model_rebuild()
ParallelStep.model_rebuild()
