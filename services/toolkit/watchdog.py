"""Says, while it happens, that the tools service's event loop is blocked, and by what.

The loop itself cannot say so: it is the thing that is stuck. A heartbeat on the loop writes the
time it last turned (every ``block_s / 4``, 40 times a second at the default: a timer, nothing on any
message's path); a daemon thread looks as often and, once the heartbeat is older than ``block_s``, reports
the stall once: the async tool step the loop runs
(``LoopIsolation.step``: tool and tenant), or else the loop thread's innermost frame. The decision
to quarantine is taken on the loop when the step returns, from its exact time
(services/toolkit/isolation.py); this report is what an operator sees of a step that never returns.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import Any

import structlog

from services.toolkit.isolation import LoopIsolation, clock

FRAMES = 5  # of the loop thread's stack, in a report of a stall outside any tool step


class LoopWatchdog:
    """Started on the loop it watches (``await start()``), stopped with ``await stop()``.

    ``report(**fields)`` is called from the watchdog's thread; by default a warning
    ``tools_loop_blocked`` with ``blocked_ms`` and ``tool``/``tenant_id`` or ``where``.
    """

    def __init__(self, isolation: LoopIsolation, *, log: Any = None, report: Callable[..., None] | None = None) -> None:
        self.isolation = isolation
        self.block_s = isolation.block_s
        self._log = log
        self._report = report or self._warn
        self._turned = clock()
        self._stopped = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._beat_handle: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._loop_thread = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopped.clear()
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="corral-loop-watchdog", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopped.set()
        self._loop = None
        if self._beat_handle is not None:
            self._beat_handle.cancel()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None

    def _beat(self) -> None:
        self._turned = clock()
        loop = self._loop
        if loop is not None:
            self._beat_handle = loop.call_later(self.block_s / 4, self._beat)

    def _watch(self) -> None:
        reported = False
        while not self._stopped.wait(self.block_s / 4):
            blocked = clock() - self._turned
            if blocked <= self.block_s:
                reported = False
                continue
            if reported:
                continue  # once per stall
            step = self.isolation.step
            if step is None:
                self._report(blocked_ms=round(blocked * 1000, 1), where=self._where())
            else:
                tool, tenant, started = step
                if (held_s := clock() - started) <= self.block_s:
                    continue  # the loop was busy before this step began: look again
                self._report(blocked_ms=round(held_s * 1000, 1), tool=tool, tenant_id=tenant)
            reported = True

    def _where(self) -> str:
        """The innermost frames the loop's thread runs now, innermost first (``file:line in
        function <- ...``): the blocking call is often the standard library's, its caller is not."""
        frame = sys._current_frames().get(self._loop_thread)
        places = []
        while frame is not None and len(places) < FRAMES:
            code = frame.f_code
            places.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
            frame = frame.f_back
        return " <- ".join(places) or "unknown"

    def _warn(self, **fields: Any) -> None:
        log = self._log or structlog.get_logger()
        log.warning("tools_loop_blocked", threshold_ms=round(self.block_s * 1000, 1), **fields)
