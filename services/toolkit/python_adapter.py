"""Python callables as tools: ``function(ctx, **arguments)``, sync or async.

``ctx`` is the runtime's :class:`~services.toolkit.context.ToolContext`. A tool with a side effect
should key it on ``ctx.idempotency_key`` when that is set: a call retried after a crash arrives
again with the same key, and a tool that remembers the key can answer without acting twice.

An async tool runs on the service's event loop, each step (the code between two awaits) timed: a
step that holds the loop longer than the isolation's ``block_s`` quarantines the tool, whose later
calls run on their tenant's own isolation loop (services/toolkit/isolation.py). A quarantined tool
runs on another event loop than the service's: loop-bound objects it keeps between calls (a
client, a lock) must be made per loop.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import structlog

from contracts.definitions import PythonTool
from contracts.errors import CorralError, DeadlineExceeded, ToolFailed, Unavailable
from services.toolkit.context import ToolContext
from services.toolkit.isolation import LoopIsolation, TimedSteps, clock
from services.toolkit.threads import ThreadBulkhead


class PythonAdapter:
    """Imports the callable once; async functions run on the loop (their tenant's isolation loop
    once quarantined, services/toolkit/isolation.py), sync ones in a worker thread of the tenant's
    share (services/toolkit/threads.py)."""

    def __init__(
        self,
        name: str,
        config: PythonTool,
        threads: ThreadBulkhead | None = None,
        isolation: LoopIsolation | None = None,
    ) -> None:
        self.name = name
        self.threads = threads or ThreadBulkhead(threads=8, per_tenant=4)
        self.isolation = isolation or LoopIsolation()
        module_name, _, attribute = config.callable.partition(":")
        try:
            self.function: Callable[..., Any] = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ToolFailed(f"tool {name!r}: cannot import {config.callable!r}: {exc}") from None
        # An object whose __call__ is async counts as async too.
        self.is_async = inspect.iscoroutinefunction(self.function) or inspect.iscoroutinefunction(
            type(self.function).__call__
        )
        if self.is_async and self.isolation.isolated_from_start(name):
            self.isolation.isolated.add(name)
        try:
            self.signature: inspect.Signature | None = inspect.signature(self.function)
        except (TypeError, ValueError):  # some builtins have no signature: let the call decide
            self.signature = None
        self._fits = _quick_check(self.signature) if self.signature is not None else None

    async def call(self, ctx: ToolContext, arguments: dict[str, Any]) -> Any:
        """Call the function with the runtime's context; its failures become typed errors."""
        if self.signature is not None and (self._fits is None or not self._fits(arguments)):
            try:
                # Checked before the call, so a TypeError raised inside the tool is not mistaken
                # for (and reported as) a bad argument.
                self.signature.bind(ctx, **arguments)
            except TypeError as exc:
                raise ToolFailed(f"tool {self.name!r} rejected its arguments: {exc}") from None
        timer = None
        steps = None
        time_left = ctx.timeout_s
        try:
            isolation = self.isolation
            if not self.is_async:
                # A sync tool that overruns keeps its worker thread until it returns (Python cannot
                # stop a thread), counted against its tenant's share; the caller still gets its
                # answer at the deadline.
                call = self.threads.run(ctx.tenant_id, self.name, self.function, ctx, **arguments)
            elif self.name in isolation.isolated:
                start = functools.partial(self.function, ctx, **arguments)
                call = isolation.run(ctx.tenant_id, self.name, start)
            else:
                call = self.function(ctx, **arguments)
                if inspect.iscoroutine(call):
                    # The first step runs now, as awaiting it would. A tool that finishes in it
                    # (no I/O: a lookup, a computation) needs no timer: none could have cut it
                    # short. One that waits runs on under the deadline from where it waits.
                    started = clock()
                    isolation.step = (self.name, ctx.tenant_id, started)
                    try:
                        waiting_on = call.send(None)
                    except StopIteration as done:
                        isolation.step = None
                        took = clock() - started
                        if took > isolation.block_s:
                            isolation.quarantine(self.name, ctx.tenant_id, took)
                            if took > ctx.timeout_s:  # it held the loop past its deadline: the caller gave up
                                raise _late(self.name, ctx) from None
                        return done.value
                    except BaseException:
                        isolation.step = None
                        if (took := clock() - started) > isolation.block_s:
                            isolation.quarantine(self.name, ctx.tenant_id, took)
                        raise
                    isolation.step = None
                    took = clock() - started
                    time_left -= took
                    steps = _MainLoopSteps(self, call, waiting_on, ctx.tenant_id)
                    if took > isolation.block_s:
                        isolation.quarantine(self.name, ctx.tenant_id, took)
                        if time_left > 0:
                            steps.blocked_s, time_left = took, 0.0  # stopped at its first await
                    call = steps
            timer = asyncio.timeout(time_left)
            if steps is not None:
                steps.timer = timer
            async with timer:
                return await call
        except CorralError:
            raise
        except Exception as exc:
            # A TimeoutError of the tool's own (a socket, say) is a failure, not our deadline.
            if isinstance(exc, TimeoutError) and timer is not None and timer.expired():
                if steps is not None and steps.blocked_s is not None:
                    raise Unavailable(
                        f"tool {self.name!r} blocked the event loop for {steps.blocked_s:.1f}s and was stopped; "
                        "its calls now run isolated, so this one may be retried"
                    ) from None
                raise _late(self.name, ctx) from None
            # The detail (message, traceback) stays in the log; the wire gets the exception's type only.
            # A fresh logger picks up the process's configuration (a rare path: its cost is irrelevant).
            structlog.get_logger().exception("tool_raised", tool=self.name, tenant_id=ctx.tenant_id, run_id=ctx.run_id)
            raise ToolFailed(f"tool {self.name!r} failed: {type(exc).__name__}") from None


def _late(tool: str, ctx: ToolContext) -> DeadlineExceeded:
    return DeadlineExceeded(f"tool {tool!r} did not finish within {ctx.timeout_s:.1f}s")


class _MainLoopSteps(TimedSteps):
    """The steps of an async tool on the service's own loop: one that blocks it quarantines the
    tool, and the call is stopped at its next await (unless its deadline does that already)."""

    __slots__ = ("adapter", "blocked_s", "timer")

    def __init__(self, adapter: PythonAdapter, coroutine: Any, waiting_on: Any, tenant: str) -> None:
        # The fields of TimedSteps set here rather than through its __init__: this is on the
        # path of every async tool call that waits.
        isolation = adapter.isolation
        self._coroutine, self._waiting_on, self._tracker = coroutine, waiting_on, isolation
        self.tool, self.tenant, self._block_s = adapter.name, tenant, isolation.block_s
        self.adapter = adapter
        self.blocked_s: float | None = None  # set when this call is stopped for blocking the loop
        self.timer: asyncio.Timeout | None = None  # the call's deadline, set once it is entered

    def blocked(self, took: float) -> None:
        self.adapter.isolation.quarantine(self.tool, self.tenant, took)
        timer = self.timer
        if timer is None or timer.expired() or self.blocked_s is not None:
            return
        now = asyncio.get_running_loop().time()
        when = timer.when()
        if when is None or when > now:
            self.blocked_s = took
            timer.reschedule(now)


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _quick_check(signature: inspect.Signature) -> Callable[[dict[str, Any]], bool] | None:
    """A check that ``function(ctx, **arguments)`` binds, for the common signatures.

    ``Signature.bind`` was a third of a Python tool call's own cost. The check is conservative:
    True only where ``bind`` would succeed; anything else goes through ``bind``, which also words
    the error. None where the signature is unusual enough to always use ``bind``.
    """
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in _POSITIONAL:
        return None
    context, rest = parameters[0].name, parameters[1:]
    if any(p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is p.empty for p in rest):
        return None
    named = frozenset(p.name for p in rest if p.kind in _BY_NAME)
    required = frozenset(p.name for p in rest if p.kind in _BY_NAME and p.default is p.empty)
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in rest)

    def fits(arguments: dict[str, Any]) -> bool:
        given = arguments.keys()
        return context not in given and required <= given and (open_ended or given <= named)

    return fits
