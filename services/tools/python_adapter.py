"""Python callables as tools: ``function(ctx, **arguments)``, sync or async.

``ctx`` is the runtime's :class:`~services.tools.context.ToolContext`. A tool with a side effect
should key it on ``ctx.idempotency_key`` when that is set: a call retried after a crash arrives
again with the same key, and a tool that remembers the key can answer without acting twice.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import structlog

from contracts.definitions import PythonTool
from contracts.errors import CorralError, DeadlineExceeded, ToolFailed
from services.tools.context import ToolContext
from services.tools.threads import ThreadBulkhead


class PythonAdapter:
    """Imports the callable once; async functions run on the loop, sync ones in a worker thread
    of the tenant's share (services/tools/threads.py)."""

    def __init__(self, name: str, config: PythonTool, threads: ThreadBulkhead | None = None) -> None:
        self.name = name
        self.threads = threads or ThreadBulkhead(threads=8, per_tenant=4)
        module_name, _, attribute = config.callable.partition(":")
        try:
            self.function: Callable[..., Any] = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ToolFailed(f"tool {name!r}: cannot import {config.callable!r}: {exc}") from None
        # An object whose __call__ is async counts as async too.
        self.is_async = inspect.iscoroutinefunction(self.function) or inspect.iscoroutinefunction(
            type(self.function).__call__
        )
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
        try:
            if self.is_async:
                call = self.function(ctx, **arguments)
                if inspect.iscoroutine(call):
                    # The first step runs now, as awaiting it would. A tool that finishes in it
                    # (no I/O: a lookup, a computation) needs no timer: none could have cut it
                    # short. One that waits runs on under the deadline from where it waits.
                    try:
                        waiting_on = call.send(None)
                    except StopIteration as done:
                        return done.value
                    call = _Rest(call, waiting_on)
            else:
                # A sync tool that overruns keeps its worker thread until it returns (Python cannot
                # stop a thread), counted against its tenant's share; the caller still gets its
                # answer at the deadline.
                call = self.threads.run(ctx.tenant_id, self.name, self.function, ctx, **arguments)
            timer = asyncio.timeout(ctx.timeout_s)
            async with timer:
                return await call
        except CorralError:
            raise
        except Exception as exc:
            # A TimeoutError of the tool's own (a socket, say) is a failure, not our deadline.
            if isinstance(exc, TimeoutError) and timer is not None and timer.expired():
                raise DeadlineExceeded(f"tool {self.name!r} did not finish within {ctx.timeout_s:.1f}s") from None
            # The detail (message, traceback) stays in the log; the wire gets the exception's type only.
            # A fresh logger picks up the process's configuration (a rare path: its cost is irrelevant).
            structlog.get_logger().exception("tool_raised", tool=self.name, tenant_id=ctx.tenant_id, run_id=ctx.run_id)
            raise ToolFailed(f"tool {self.name!r} failed: {type(exc).__name__}") from None


class _Rest:
    """Awaiting it resumes a coroutine whose first step has already run, from the future it is
    waiting on: ``yield from`` by hand, so sends, throws (cancellation) and close reach it."""

    __slots__ = ("_coroutine", "_waiting_on")

    def __init__(self, coroutine: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
        self._coroutine = coroutine
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine, waiting_on = self._coroutine, self._waiting_on
        while True:
            try:
                sent = yield waiting_on
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:
                try:
                    waiting_on = coroutine.throw(error)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    waiting_on = coroutine.send(sent)
                except StopIteration as done:
                    return done.value


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
