"""The event loop every Corral process runs on.

uvloop where it is installed (a dependency on Linux and macOS), asyncio's own loop elsewhere or
with ``CORRAL_EVENT_LOOP=asyncio``. Measured with ``corral bench`` on a 2-core machine, a request
through client -> router -> graph -> tool -> client takes about a third less time per hop on
uvloop: each hop is a few loop iterations and a socket read and write, and uvloop's are cheaper.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
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


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the chosen loop."""
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
