"""The workflow engine's logic without a broker: folding a history, planning the next step,
retries and backoff, interruptions, branches, parallel joins, waits, sleeps and sagas."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from contracts.definitions import Catalog, DefinitionError, DefinitionsFile
from contracts.workflows import WorkflowDefinition
from services.workflow.engine import (
    MAX_INTERRUPTIONS,
    CompiledWorkflow,
    Ev,
    RunCompensation,
    RunStep,
    apply,
    later_waits,
    plan,
    started,
    step_failure,
)

NOW = 1_000_000.0


def workflow(text: str) -> CompiledWorkflow:
    return CompiledWorkflow(WorkflowDefinition.model_validate(yaml.safe_load(text)))


LINEAR = """
name: linear
steps:
  - {name: a, kind: tool, tool: t, args: {v: $input.v}, compensate: {tool: undo, args: {x: $a.v}}}
  - {name: b, kind: tool, tool: t, args: {v: $a.v}, retry: {initial_interval_s: 1, backoff: 2, max_attempts: 3}}
  - {name: c, kind: function, callable: "m:f"}
output: b.v
"""


class Run:
    """A history being written, as the driver writes it."""

    def __init__(self, compiled: CompiledWorkflow, input: dict | None = None, params: dict | None = None) -> None:
        self.workflow = compiled
        self.seq = 1
        first = {
            "type": Ev.RUN_STARTED,
            "run_id": "r1",
            "workflow": compiled.definition.name,
            "digest": compiled.digest,
            "definition": compiled.definition.model_dump(mode="json", by_alias=True),
            "input": input or {},
            "params": params or {},
            "principal": "dev",
            "at": NOW,
        }
        self.state = started(first, "acme", 1)

    def record(self, **event) -> None:
        self.seq += 1
        apply(self.state, event, self.seq)

    def plan(self, now: float = NOW, running: frozenset[str] = frozenset()):
        return plan(self.state, self.workflow, now=now, running=running)

    def complete(self, step: str, output) -> None:
        self.record(type=Ev.STEP_STARTED, step=step, attempt=self.state.attempts.get(step, 0) + 1)
        self.record(type=Ev.STEP_COMPLETED, step=step, output=output)


def test_steps_run_in_order_and_the_output_is_the_declared_path():
    run = Run(workflow(LINEAR), {"v": 1})
    assert run.plan().runs == [RunStep("a", 1)]
    run.complete("a", {"v": 2})
    assert run.plan().runs == [RunStep("b", 1)]
    assert run.plan(running=frozenset({"b"})).runs == []  # already running here: not again
    run.complete("b", {"v": 3})
    run.complete("c", 6)
    done = run.plan()
    assert done.records == [{"type": Ev.RUN_COMPLETED, "output": 3}]
    run.record(**done.records[0])
    assert run.plan().finished and run.state.status == "completed"


def test_a_retryable_failure_backs_off_exponentially_then_fails_for_good():
    compiled = workflow(LINEAR)
    run = Run(compiled, {"v": 1})
    run.complete("a", {"v": 2})
    for attempt, delay in ((1, 1.0), (2, 2.0)):
        run.record(type=Ev.STEP_STARTED, step="b", attempt=attempt)
        failure = step_failure(run.state, compiled, "b", attempt, "tool_failed", "down", now=NOW)
        assert failure["final"] is False and failure["retry_at"] == NOW + delay
        run.record(**failure)
        waiting = run.plan(now=NOW)
        assert waiting.runs == [] and waiting.until == NOW + delay
        assert run.plan(now=NOW + delay).runs == [RunStep("b", attempt + 1)]
    run.record(type=Ev.STEP_STARTED, step="b", attempt=3)
    final = step_failure(run.state, compiled, "b", 3, "tool_failed", "down", now=NOW)
    assert final["final"] is True
    run.record(**final)
    failing = run.plan()
    assert failing.records[0]["type"] == Ev.RUN_FAILING and failing.records[0]["step"] == "b"


def test_a_refusal_is_not_retried():
    compiled = workflow(LINEAR)
    run = Run(compiled, {"v": 1})
    failure = step_failure(run.state, compiled, "a", 1, "forbidden", "not allowed", now=NOW)
    assert failure["final"] is True


def test_a_failed_run_compensates_completed_steps_in_reverse_then_ends_failed():
    compiled = workflow(LINEAR)
    run = Run(compiled, {"v": 1})
    run.complete("a", {"v": 2})
    run.record(type=Ev.STEP_STARTED, step="b", attempt=1)
    run.record(type=Ev.STEP_FAILED, step="b", attempt=1, code="forbidden", message="no", final=True)
    run.record(**run.plan().records[0])
    assert run.plan(running=frozenset({"x"})).runs == []  # compensation waits for running steps
    assert run.plan().runs == [RunCompensation("a", 1)]
    run.record(type=Ev.COMPENSATION_STARTED, step="a", attempt=1)
    run.record(type=Ev.COMPENSATION_COMPLETED, step="a")
    end = run.plan().records[0]
    assert end["type"] == Ev.RUN_FAILED and end["code"] == "forbidden"


def test_an_interrupted_attempt_runs_again_and_endless_interruptions_fail_the_step():
    run = Run(workflow(LINEAR), {"v": 1})
    run.record(type=Ev.STEP_STARTED, step="a", attempt=1)  # its replica died mid-call
    assert run.plan().runs == [RunStep("a", 2)]
    for attempt in range(2, MAX_INTERRUPTIONS + 1):
        run.record(type=Ev.STEP_STARTED, step="a", attempt=attempt)
    gave_up = run.plan().records[0]
    assert gave_up["type"] == Ev.STEP_FAILED and gave_up["final"] and gave_up["code"] == "unavailable"


def test_a_branch_is_chosen_once_from_the_state_and_its_steps_run():
    compiled = workflow(
        """
name: gate
steps:
  - {name: look, kind: tool, tool: t}
  - name: g
    kind: branch
    if: "look.amount > params.threshold"
    then: [{name: approve, kind: wait, signal: approve, scope: "refund:approve", timeout_s: 60}]
    else: [{name: auto, kind: function, callable: "m:f"}]
  - {name: pay, kind: tool, tool: t}
"""
    )
    run = Run(compiled, params={"threshold": 100})
    run.complete("look", {"amount": 500})
    chosen = run.plan().records[0]
    assert chosen == {"type": Ev.BRANCH_CHOSEN, "step": "g", "arm": "then"}
    run.record(**chosen)
    begin = run.plan().records[0]
    assert begin["type"] == Ev.WAITING and begin["until"] == NOW + 60
    run.record(**begin)
    blocked = run.plan()
    assert blocked.records == [] and blocked.runs == [] and blocked.waiting_for == ["approve"]
    run.record(type=Ev.SIGNAL_RECEIVED, step="approve", signal="approve", by="boss", scope="refund:approve", data={})
    run.record(**run.plan().records[0])  # the branch completes with its last output
    assert run.plan().runs == [RunStep("pay", 1)]
    assert run.state.approvals["approve"]["by"] == "boss"


def test_a_wait_times_out_and_fails_or_continues_as_declared():
    for on_timeout, expected in (("fail", Ev.RUN_FAILING), ("continue", Ev.RUN_COMPLETED)):
        compiled = workflow(
            f"name: w\nsteps:\n  - {{name: w, kind: wait, signal: s, timeout_s: 5, on_timeout: {on_timeout}}}\n"
        )
        run = Run(compiled)
        run.record(**run.plan().records[0])
        assert run.plan(now=NOW + 4).until == NOW + 5
        run.record(**run.plan(now=NOW + 5).records[0])
        assert run.plan(now=NOW + 5).records[0]["type"] == expected


def test_a_sleep_is_a_durable_timer():
    run = Run(workflow("name: s\nsteps:\n  - {name: nap, kind: sleep, seconds: 30}\n"))
    sleeping = run.plan().records[0]
    assert sleeping == {"type": Ev.SLEEPING, "step": "nap", "until": NOW + 30}
    run.record(**sleeping)
    assert run.plan(now=NOW + 10).until == NOW + 30  # woken early (a spurious wake-up): sleeps on
    run.record(**run.plan(now=NOW + 30).records[0])
    assert run.plan(now=NOW + 30).records[0]["type"] == Ev.RUN_COMPLETED


def test_parallel_branches_run_together_and_join_all_or_any():
    text = """
name: p
steps:
  - name: both
    kind: parallel
    join: {join}
    branches:
      left: [{{name: l1, kind: tool, tool: t}}, {{name: l2, kind: tool, tool: t}}]
      right: [{{name: r1, kind: tool, tool: t}}]
"""
    run = Run(workflow(text.format(join="all")))
    assert run.plan().runs == [RunStep("l1", 1), RunStep("r1", 1)]
    run.complete("r1", "R")
    run.complete("l1", "L1")
    assert run.plan().runs == [RunStep("l2", 1)]
    run.complete("l2", "L2")
    joined = run.plan().records[0]
    assert joined["output"] == {"left": "L2", "right": "R"}

    run = Run(workflow(text.format(join="any")))
    run.complete("r1", "R")
    first = run.plan()
    assert first.records[0]["output"] == {"right": "R"} and first.runs == []


def test_a_run_keeps_the_definition_it_started_with():
    old = workflow(LINEAR)
    run = Run(old, {"v": 1})
    new = workflow(LINEAR.replace("name: c, kind: function", "name: d, kind: function"))
    assert new.digest != old.digest
    assert run.state.digest == old.digest and run.state.definition["steps"][2]["name"] == "c"


def test_a_state_round_trips_through_its_snapshot():
    run = Run(workflow(LINEAR), {"v": 1})
    run.complete("a", {"v": 2})
    from services.workflow.engine import RunState

    again = RunState.from_json(run.state.to_json())
    assert again == run.state


def test_a_ten_thousand_step_run_plans_and_folds():
    steps = [{"name": f"s{i}", "kind": "function", "callable": "m:f"} for i in range(10_000)]
    compiled = CompiledWorkflow(WorkflowDefinition(name="long", steps=steps))
    run = Run(compiled)
    for i in range(10_000):
        assert run.plan().runs == [RunStep(f"s{i}", 1)]
        run.complete(f"s{i}", i)
    assert run.plan().records[0]["type"] == Ev.RUN_COMPLETED


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"args": {"v": "$nope.x"}}, "reads 'nope'"),
        ({"name": "input"}, "reserved"),
        ({"kind": "model", "prompt": "x"}, "names no model"),
    ],
)
def test_bad_workflow_definitions_are_refused_with_a_precise_message(change, message):
    step = {"name": "a", "kind": "tool", "tool": "t", **change}
    if step["kind"] == "model":
        step.pop("tool")
        step.pop("args", None)
    with pytest.raises(ValidationError, match=message):
        WorkflowDefinition.model_validate({"name": "w", "steps": [step]})


def test_a_workflow_route_must_name_known_workflows_and_allowed_tools():
    document = {
        "tools": [{"name": "t", "python": {"callable": "m:f"}}],
        "workflows": [{"name": "w", "steps": [{"name": "a", "kind": "tool", "tool": "t"}]}],
        "tenants": [{"tenant": "acme", "routes": {"w": {"pattern": "workflow", "workflow": "w"}}, "tools": []}],
    }
    with pytest.raises(DefinitionError, match="needs tools"):
        Catalog.merge([DefinitionsFile.model_validate(document)])
    document["tenants"][0]["routes"]["w"]["workflow"] = "missing"
    with pytest.raises(DefinitionError, match="unknown workflow"):
        Catalog.merge([DefinitionsFile.model_validate(document)])
    with pytest.raises(ValidationError, match="takes no 'graph'"):
        DefinitionsFile.model_validate(
            {"tenants": [{"tenant": "a", "routes": {"x": {"pattern": "workflow", "workflow": "w", "graph": "g"}}}]}
        )


EARLY = """
name: early
steps:
  - {name: first, kind: wait, signal: first, timeout_s: 60}
  - name: gate
    kind: branch
    if: "input.big"
    then: [{name: boss, kind: wait, signal: approve, scope: "refund:approve", timeout_s: 60}]
    else: [{name: anyone, kind: wait, signal: approve, timeout_s: 60}]
"""


def test_a_signal_kept_from_before_its_wait_is_taken_when_the_run_gets_there():
    run = Run(workflow(EARLY), {"big": True})
    run.record(**run.plan().records[0])  # waiting at `first`
    assert [step.name for step in later_waits(run.state, run.workflow, "approve")] == ["boss", "anyone"]
    run.record(type=Ev.SIGNAL_BUFFERED, signal="approve", by="clerk", scope=None, data={"n": 1})
    run.record(type=Ev.SIGNAL_BUFFERED, signal="approve", by="boss", scope="refund:approve", data={"n": 2})
    run.record(type=Ev.SIGNAL_RECEIVED, step="first", signal="first", by="clerk", scope=None, data={})
    run.record(**run.plan().records[0])  # the branch takes `then`
    taken = run.plan().records[0]
    # `boss` needs the scope: the clerk's signal stays, the manager's (second in the buffer) is taken.
    assert taken["type"] == Ev.SIGNAL_RECEIVED and taken["step"] == "boss" and taken["buffered"] == 1
    assert taken["by"] == "boss" and taken["data"] == {"n": 2}
    run.record(**taken)
    assert [signal["by"] for signal in run.state.buffered] == ["clerk"]
    assert run.state.approvals["boss"]["by"] == "boss"
    # The arm not taken is no longer ahead: a signal only its wait would take has nowhere to go.
    assert later_waits(run.state, run.workflow, "approve") == []


def test_a_signal_kept_for_a_wait_is_taken_without_the_run_waiting():
    run = Run(workflow(EARLY), {"big": False})
    run.record(type=Ev.SIGNAL_BUFFERED, signal="approve", by="clerk", scope=None, data={})
    run.record(type=Ev.SIGNAL_RECEIVED, step="first", signal="first", by="clerk", scope=None, data={})
    run.record(**run.plan().records[0])  # the branch takes `else`
    taken = run.plan().records[0]
    assert taken["step"] == "anyone" and taken["buffered"] == 0
    run.record(**taken)
    run.record(**run.plan().records[0])  # the branch completes
    assert run.plan().records[0]["type"] == Ev.RUN_COMPLETED
    assert "anyone" not in run.state.waits  # it never waited
