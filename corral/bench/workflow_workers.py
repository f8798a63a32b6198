"""The five-step workflow as each engine ``corral bench workflow`` compares runs it, and the
worker processes of its recovery measurement (started by :mod:`corral.bench.workflow_others`).

Every engine runs the same :func:`step`, which returns ``{"step": index, "value": value + 1}``:
a run starts at 0 and ends at :data:`STEPS`. The step is trivial on purpose, so what is measured
is each engine's recording of it.

Temporal's sandbox re-imports this module for every workflow run, as it does a user's
``workflows.py``; so at the top it imports only the standard library and temporalio, and nats-py
and DBOS are imported where they are used.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

try:
    from temporalio import activity, workflow
except ImportError:  # without the bench extra: only the Temporal side needs it
    activity = workflow = None  # type: ignore[assignment]

STEPS = 5
# The samples' value (temporalio/samples-python); a killed worker's activity is retried after it.
ACTIVITY_TIMEOUT = timedelta(seconds=10)
FLOOR_STREAM = "FLOOR"
FLOOR_SUBJECT = "floor"
FLOOR_BUCKET = "floor_runs"
DBOS_APP = "corral-bench"


@dataclass
class _WorkerSettings:
    """How a recovery worker slows and reports its steps; in-process runs keep the defaults."""

    delay_s: float = 0.0
    report: bool = False


_settings = _WorkerSettings()


def step(index: int, value: int) -> dict[str, int]:
    """One step of the workflow."""
    return {"step": index, "value": value + 1}


def _stepped() -> None:
    """Tell the parent a step ran (it kills the worker once enough have)."""
    if _settings.report:
        print("step", flush=True)


async def _step_async(index: int, value: int) -> dict[str, int]:
    if _settings.delay_s:
        await asyncio.sleep(_settings.delay_s)
    _stepped()
    return step(index, value)


def _step_blocking(index: int, value: int) -> dict[str, int]:
    if _settings.delay_s:
        time.sleep(_settings.delay_s)  # a DBOS step runs in a thread of its own
    _stepped()
    return step(index, value)


# --- Temporal: five activities in a workflow, module-level as the sandbox requires ---

if activity is not None and workflow is not None:

    @activity.defn(name="corral_bench_step")
    async def temporal_step(index: int, value: int) -> dict[str, int]:
        """The step as an activity."""
        return await _step_async(index, value)

    @workflow.defn(name="CorralBenchFiveSteps")
    class TemporalFiveSteps:
        """The five steps, each an activity with default options but the required timeout."""

        @workflow.run
        async def run(self, value: int) -> int:
            for index in range(1, STEPS + 1):
                result = await workflow.execute_activity(
                    temporal_step, args=[index, value], start_to_close_timeout=ACTIVITY_TIMEOUT
                )
                value = result["value"]
            return value


def _host_modules() -> list[str]:
    """The modules Temporal's sandbox takes from the host: all loaded ones but this module and
    its packages. It re-imports those for each run, as it would a user's workflow file; the rest
    (Corral's stack, which ``corral.bench`` imports) a user's workflow file would not import."""
    parts = __name__.split(".")
    reimported = {".".join(parts[: end + 1]) for end in range(len(parts))}
    return [name for name in list(sys.modules) if name not in reimported and not name.startswith("__")]


def temporal_worker(client: Any, task_queue: str) -> Any:
    """A normal Temporal worker (sandboxed workflows, default slots and pollers) for the workflow."""
    from temporalio.worker import Worker
    from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

    restrictions = SandboxRestrictions.default.with_passthrough_modules(*_host_modules())
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[TemporalFiveSteps],
        activities=[temporal_step],
        workflow_runner=SandboxedWorkflowRunner(restrictions=restrictions),
    )


async def temporal_worker_process(address: str, task_queue: str, delay_s: float) -> None:
    """A worker process of the recovery measurement: polls until it is killed."""
    from temporalio.client import Client

    _settings.delay_s, _settings.report = delay_s, True
    client = await Client.connect(address)
    async with temporal_worker(client, task_queue):
        print("ready", flush=True)
        await asyncio.Event().wait()


# --- DBOS: five steps in a workflow, registered on first use ---


@functools.cache
def dbos_workflow() -> Callable[[int], int]:
    """The DBOS workflow, under fixed names, so a fresh process recovers a killed one's runs."""
    from dbos import DBOS

    @DBOS.step(name="corral_bench_step")
    def dbos_step(index: int, value: int) -> dict[str, int]:
        return _step_blocking(index, value)

    @DBOS.workflow(name="corral_bench_five_steps")
    def five_steps(value: int) -> int:
        for index in range(1, STEPS + 1):
            value = dbos_step(index, value)["value"]
        return value

    return five_steps


def dbos_config(database: Path) -> dict[str, Any]:
    """DBOS on a SQLite file, quiet."""
    return {"name": DBOS_APP, "system_database_url": f"sqlite:///{database}", "log_level": "WARNING"}


def dbos_worker_process(database: Path, run_ids: list[str], delay_s: float) -> None:
    """A worker process of the recovery measurement: launching recovers this executor's pending
    runs (a fresh process has the same executor id, ``local``); it starts the runs that do not
    exist yet, waits for all and prints ``done`` with how many ended at :data:`STEPS`."""
    from dbos import DBOS, SetWorkflowID

    _settings.delay_s, _settings.report = delay_s, True
    five_steps = dbos_workflow()
    DBOS(config=dbos_config(database))  # type: ignore[arg-type]
    DBOS.launch()
    try:
        for run_id in run_ids:
            if DBOS.get_workflow_status(run_id) is None:
                with SetWorkflowID(run_id):
                    DBOS.start_workflow(five_steps, 0)
        print("ready", flush=True)
        # A short polling interval, so the figure is the recovery's, not the waiting's.
        values = [DBOS.retrieve_workflow(run_id).get_result(polling_interval_sec=0.02) for run_id in run_ids]
        print("done", sum(value == STEPS for value in values), flush=True)
    finally:
        DBOS.destroy()


# --- The floor: the step loop on raw JetStream, a stream message and a KV update per step ---


async def floor_setup(js: Any) -> Any:
    """The stream of step results and the KV bucket of run states, both on file storage."""
    from nats.js.api import StorageType

    await js.add_stream(name=FLOOR_STREAM, subjects=[f"{FLOOR_SUBJECT}.>"], storage=StorageType.FILE)
    return await js.create_key_value(bucket=FLOOR_BUCKET, storage=StorageType.FILE, history=1)


async def floor_run(js: Any, kv: Any, run_id: str, *, state: dict[str, int] | None = None, revision: int = 0) -> int:
    """Run (or continue, from ``state`` at ``revision``) one run: each step publishes its result
    and awaits the ack, then writes the run's state with the expected revision (create first)."""
    state = state or {"step": 0, "value": 0}
    while state["step"] < STEPS:
        state = await _step_async(state["step"] + 1, state["value"])
        payload = json.dumps(state).encode()
        await js.publish(f"{FLOOR_SUBJECT}.{run_id}", payload)
        if revision:
            revision = await kv.update(run_id, payload, last=revision)
        else:
            revision = await kv.create(run_id, payload)
    return state["value"]


async def floor_resume(js: Any, kv: Any, run_id: str) -> int:
    """Continue a run from the step last recorded in KV (or start it). The step in flight when a
    worker died runs again and its result is published again: at least once, as the engines do."""
    from nats.js.errors import KeyNotFoundError

    try:
        entry = await kv.get(run_id)
    except KeyNotFoundError:
        return await floor_run(js, kv, run_id)
    return await floor_run(js, kv, run_id, state=json.loads(entry.value), revision=entry.revision)


async def floor_worker_process(url: str, run_ids: list[str], delay_s: float) -> None:
    """A worker process of the recovery measurement: resumes or starts each run, prints ``done``
    with how many ended at :data:`STEPS`."""
    import nats

    _settings.delay_s, _settings.report = delay_s, True
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        kv = await js.key_value(FLOOR_BUCKET)
        print("ready", flush=True)
        values = await asyncio.gather(*(floor_resume(js, kv, run_id) for run_id in run_ids))
        print("done", sum(value == STEPS for value in values), flush=True)
    finally:
        await nc.close()
