"""Async tools that block the event loop run on event loops of their tenant's own.

A coroutine runs in steps, from one await to the next, and nothing can stop a step once it runs.
An async tool that calls ``time.sleep``, computes for a second or reads a socket without awaiting
holds the tools service's loop, and with it every tenant's calls, the ping and the statistics.
So every step of an async tool on the service's loop is timed (two clock reads, see
:class:`TimedSteps`), and a step longer than ``block_s`` *quarantines* the tool: the call that
blocked is stopped at its next await (``python_adapter.py``), and the tool's later calls run here,
each on the *isolation loop* of the calling tenant: an event loop in a thread of its own, so a
tool that blocks again stalls only that tenant's isolated calls. Operators can name tools (or
``*``, every async tool) that run isolated from their first call.

Bounds, so that a stuck tool holds only what its tenant was given:

- at most ``loops`` isolation loops (threads) at once; a tenant that needs one when all are
  taken gets the one idle longest, and ``unavailable`` when none is idle;
- at most ``per_tenant`` calls on one tenant's loop, queued, running or past their deadline
  (a call blocking its thread cannot be stopped, so it counts until it returns); past that a call
  is refused at once (``rate_limited``), and while a step holds the tenant's loop for longer than
  ``block_s`` new calls are refused at once (``unavailable``) instead of queueing behind it;
- the caller's deadline is kept on the service's loop: at the deadline the caller gets
  ``deadline_exceeded`` whatever the isolation loop is doing; a call still queued then never
  starts and its place is freed at once, a running one is cancelled at its next await.

Limit: a thread cannot be killed. A quarantined call that never returns holds its tenant's
isolation loop (and one of the ``loops``) for good; its tenant's further isolated calls are
refused, nobody else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import resource
import threading
import time
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from contracts.errors import RateLimited, Unavailable

clock = time.perf_counter  # the clock of the steps' times (CLOCK_MONOTONIC, the same in every thread)
_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)  # Linux; elsewhere the wall clock decides alone


def thread_usage() -> Any:
    """This thread's CPU times and context switches so far (about 0.2 µs), or None where the
    system does not count them per thread."""
    return resource.getrusage(_RUSAGE_THREAD) if _RUSAGE_THREAD is not None else None


def held_the_loop(before: Any, block_s: float) -> bool:
    """Whether a step that took longer than ``block_s`` by the wall clock held the loop itself: it
    computed for at least half of that, or it blocked in the kernel (a voluntary context switch:
    a sleep, a read that does not await). A step that was only waiting for a core while other
    processes ran (an involuntary switch, a busy machine) did not: it is not the tool's doing, and
    quarantining a well-behaved tool on a loaded machine would refuse its tenant's calls."""
    if before is None:
        return True
    after = resource.getrusage(_RUSAGE_THREAD)
    computed = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return computed >= block_s / 2 or after.ru_nvcsw > before.ru_nvcsw


Step = tuple[str, str, float]  # (tool, tenant, when the step started on ``clock``)
UNSTARTED: Any = object()  # a coroutine whose first step has not run yet


class StepTracker(Protocol):
    """Where the step an event loop runs now is written: the watchdog and the refusals read it."""

    step: Step | None


class TimedSteps:
    """Awaiting it runs a coroutine step by step (``yield from`` by hand, so sends, throws
    (cancellation) and close reach it), writing each step into ``tracker`` and calling
    :meth:`blocked` after a step that held its loop longer than ``block_s``.

    ``waiting_on``: what the coroutine waits on after a first step already run, or ``UNSTARTED``.
    """

    __slots__ = ("_block_s", "_coroutine", "_tracker", "_waiting_on", "tenant", "tool")

    def __init__(
        self,
        coroutine: Coroutine[Any, Any, Any],
        waiting_on: Any,
        tracker: StepTracker,
        tool: str,
        tenant: str,
        block_s: float,
    ) -> None:
        self._coroutine = coroutine
        self._waiting_on = waiting_on
        self._tracker = tracker
        self.tool = tool
        self.tenant = tenant
        self._block_s = block_s

    def blocked(self, took: float) -> None:
        """Called after a step that held the loop for ``took`` seconds (more than ``block_s``)."""

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, tracker, waiting_on = self._coroutine, self._tracker, self._waiting_on
        step: Callable[[Any], Any] | None = None
        value: Any = None
        if waiting_on is UNSTARTED:
            step = coroutine.send
        while True:
            if step is None:
                try:
                    sent = yield waiting_on
                except GeneratorExit:
                    coroutine.close()
                    raise
                except BaseException as error:
                    step, value = coroutine.throw, error
                else:
                    step, value = coroutine.send, sent
            started = clock()
            before = thread_usage()
            tracker.step = (self.tool, self.tenant, started)
            try:
                waiting_on = step(value)
            except StopIteration as done:
                return done.value
            finally:
                tracker.step = None
                took = clock() - started
                if took > self._block_s and held_the_loop(before, self._block_s):
                    self.blocked(took)
            step, value = None, None


@dataclass(frozen=True)
class Quarantine:
    """Why a tool runs isolated: the tenant whose call blocked the loop, and for how long."""

    tenant: str
    blocked_s: float


class LoopIsolation:
    """Which async tools run isolated, the isolation loops of the tenants, and the step the
    service's own loop runs now (for :class:`~services.toolkit.watchdog.LoopWatchdog`)."""

    def __init__(
        self,
        *,
        block_s: float = 0.1,
        isolated: tuple[str, ...] = (),
        loops: int = 32,
        per_tenant: int = 8,
        log: Any = None,
    ) -> None:
        self.block_s = block_s
        self.step: Step | None = None  # the async tool step the service's loop runs now
        self.isolated: set[str] = set()  # tools whose calls run on their tenant's isolation loop
        self.quarantined: dict[str, Quarantine] = {}
        self._from_start = frozenset(isolated)
        self._max_loops = loops
        self._per_tenant = per_tenant
        self._log = log
        self._loops: dict[str, _TenantLoop] = {}  # the most recently used last
        self._threads: list[threading.Thread] = []

    def isolated_from_start(self, tool: str) -> bool:
        """Whether the operator asked for ``tool`` to run isolated from its first call."""
        return tool in self._from_start or "*" in self._from_start

    def quarantine(self, tool: str, tenant: str, blocked_s: float) -> None:
        """``tool`` blocked the service's loop for ``blocked_s``: its later calls run isolated."""
        if tool in self.quarantined:
            return
        self.quarantined[tool] = Quarantine(tenant, blocked_s)
        self.isolated.add(tool)
        log = self._log or structlog.get_logger()
        log.warning(
            "tool_quarantined",
            tool=tool,
            tenant_id=tenant,
            blocked_ms=round(blocked_s * 1000, 1),
            threshold_ms=round(self.block_s * 1000, 1),
        )

    def held(self, tenant: str) -> int:
        """Calls of ``tenant`` on its isolation loop: queued, running or past their deadline."""
        home = self._loops.get(tenant)
        return home.held if home is not None else 0

    def threads(self) -> list[threading.Thread]:
        """The isolation threads still alive (stopped ones end once their loop turns)."""
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        return list(self._threads)

    async def run(self, tenant: str, tool: str, start: Callable[[], Any]) -> Any:
        """``start()`` (the call of the tool) on ``tenant``'s isolation loop; its outcome, here.

        Cancelled (by the caller's deadline), the call is dropped if it has not started, else
        cancelled on its loop; either way this returns at once.
        """
        home = self._loop_for(tenant, tool)
        job = _Job(tool, tenant, start, asyncio.get_running_loop())
        home.submit(job, self._per_tenant)
        try:
            return await job.future
        finally:
            if job.future.cancelled() or not job.future.done():
                home.abandon(job)

    def _loop_for(self, tenant: str, tool: str) -> _TenantLoop:
        home = self._loops.pop(tenant, None)
        if home is None:
            if len(self._loops) >= self._max_loops and not self._retire_idle():
                raise Unavailable(
                    f"tool {tool!r}: all {self._max_loops} isolation loops are busy with other tenants' calls; "
                    "try again later"
                )
            home = _TenantLoop(tenant, self.block_s)
            self._threads = [*self.threads(), home.thread]
        self._loops[tenant] = home
        step = home.step
        if step is not None and (stuck := clock() - step[2]) > self.block_s:
            raise Unavailable(
                f"tool {tool!r}: a call of tool {step[0]!r} has held the isolation loop of tenant {tenant!r} "
                f"for {stuck:.1f}s; try again when it returns"
            )
        return home

    def _retire_idle(self) -> bool:
        for tenant, home in self._loops.items():
            if home.held == 0:  # only this thread adds calls: idle stays idle
                del self._loops[tenant]
                home.stop()
                return True
        return False

    def close(self) -> None:
        """Stop every isolation loop (a blocked one stops when its step returns)."""
        for home in self._loops.values():
            home.stop()
        self._loops.clear()


class _Job:
    """One isolated call: made on the service's loop, run on the tenant's, answered back."""

    __slots__ = ("abandoned", "context", "future", "home", "start", "task", "tenant", "tool")

    def __init__(self, tool: str, tenant: str, start: Callable[[], Any], home: asyncio.AbstractEventLoop) -> None:
        self.tool = tool
        self.tenant = tenant
        self.start = start
        self.home = home
        self.future: asyncio.Future[Any] = home.create_future()
        self.context = contextvars.copy_context()
        self.task: asyncio.Task[None] | None = None  # set on the isolation loop when it starts
        self.abandoned = False  # given up before it started: it never will

    def settle(self, result: Any, error: BaseException | None) -> None:
        if self.future.done():
            return
        if error is None:
            self.future.set_result(result)
        else:
            self.future.set_exception(error)


class _TenantLoop:
    """An event loop in a daemon thread of its own, running one tenant's isolated calls."""

    def __init__(self, tenant: str, block_s: float) -> None:
        self.tenant = tenant
        self.block_s = block_s
        self.step: Step | None = None  # written by this loop's thread, read by the service's
        self.held = 0  # calls queued, running or past their deadline; changed under ``lock``
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=f"corral-isolated-{tenant}", daemon=True)
        self.thread.start()

    def submit(self, job: _Job, per_tenant: int) -> None:
        with self.lock:
            if self.held >= per_tenant:
                raise RateLimited(
                    f"tool {job.tool!r}: tenant {self.tenant!r} already has {self.held} isolated calls of async "
                    "tools in flight (some may be past their deadline); try again when they finish"
                )
            self.held += 1
        self.loop.call_soon_threadsafe(self._begin, job)

    def abandon(self, job: _Job) -> None:
        """The caller gave up: a queued call never starts (its place is freed now), a running one is
        cancelled at its next await (it counts until it ends)."""
        with self.lock:
            task = job.task
            if task is None:
                if not job.abandoned:
                    job.abandoned = True
                    self.held -= 1
                return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the call has ended
            self.loop.call_soon_threadsafe(task.cancel)

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)

    # ---- on the isolation thread --------------------------------------------------------

    def _begin(self, job: _Job) -> None:
        with self.lock:
            if job.abandoned:
                return
            job.task = self.loop.create_task(self._execute(job), context=job.context)

    async def _execute(self, job: _Job) -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            call = job.start()
            if inspect.iscoroutine(call):
                call = TimedSteps(call, UNSTARTED, self, job.tool, job.tenant, self.block_s)
            result = await call
        except asyncio.CancelledError:  # its caller gave up, or the service is stopping
            error = Unavailable(f"tool {job.tool!r}: the isolated call was stopped")
        except Exception as exc:
            error = exc
        finally:
            with self.lock:
                self.held -= 1
        with contextlib.suppress(RuntimeError):  # the service's loop is gone: nobody waits
            job.home.call_soon_threadsafe(job.settle, result, error)

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
            loop.close()
