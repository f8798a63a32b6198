"""The event loop every Corral process runs on.

uvloop where it is installed (a dependency on Linux and macOS), asyncio's own loop elsewhere or
with ``CORRAL_EVENT_LOOP=asyncio``. Measured with ``corral bench`` on a 2-core machine, a request
through client -> router -> graph -> tool -> client takes about a third less time per hop on
uvloop: each hop is a few loop iterations and a socket read and write, and uvloop's are cheaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from collections.abc import Coroutine, Iterator
from typing import Any, Literal, TypeVar

T = TypeVar("T")
LOOPS = ("uvloop", "asyncio")


def loop_name() -> Literal["uvloop", "asyncio"]:
    """The loop this process runs on: ``CORRAL_EVENT_LOOP`` if set, else uvloop when installed."""
    wanted = os.environ.get("CORRAL_EVENT_LOOP", "").strip().lower()
    if wanted and wanted not in LOOPS:
        raise SystemExit(f"error: CORRAL_EVENT_LOOP must be one of {', '.join(LOOPS)}, not {wanted!r}")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if wanted == "uvloop":
            raise SystemExit("error: CORRAL_EVENT_LOOP=uvloop but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


# Python's cycle collector runs its youngest generation every 700 allocations by default. A service
# allocates quickly (each message makes envelopes, dicts, futures and tasks, nearly all freed by
# reference counting) and holds a large long-lived heap (definitions, caches), so collections
# were frequent and each walked survivors that were never garbage: with 20,000 the workflow
# engine spent 15 % less CPU per run at 32 runs in flight (0.61-0.66 ms against 0.51-0.56 ms,
# `corral bench workflow`'s local side). Cyclic garbage is still collected, a little later.
GC_THRESHOLDS = (20_000, 10, 10)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cycle collection while a process loads what it keeps (its definitions): the collector
    walked the growing heap again and again as 10,000 tenants' policies were built, 1.0 s of
    loading them against 0.42 s without it. Bounded work, pure CPU: any cyclic garbage it leaves
    is collected after it (by :func:`settle_gc`, or the next collection)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def settle_gc() -> None:
    """Once a process has loaded what it keeps for its lifetime: collect, move everything alive
    now out of the collector's sight (``gc.freeze``: never garbage, never walked again) and
    collect less often from then on (:data:`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the chosen loop."""
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
