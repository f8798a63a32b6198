"""Worker threads for synchronous tools, with a bulkhead per tenant.

Python cannot stop a thread: a sync tool that outlives its deadline keeps its thread until it
returns. In one shared pool, a few such calls of one tenant left every other tenant's sync tools
waiting for a thread. Here each tenant may hold at most ``per_tenant`` threads, overrunning calls
included, and is refused at once past that (``rate_limited``, naming why); a call that has not
started by its deadline never starts (its queued work is cancelled), so a deadline frees what it
reserved. The pool itself (``threads``) bounds them all together.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from contracts.errors import RateLimited

T = TypeVar("T")


class ThreadBulkhead:
    def __init__(self, *, threads: int, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="corral-tool")
        self._held: dict[str, int] = {}  # tenant -> threads reserved (queued, running or overrunning)

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)

    async def run(self, tenant: str, tool: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` in a worker thread, counted against ``tenant``'s share."""
        held = self._held.get(tenant, 0)
        if held >= self.per_tenant:
            raise RateLimited(
                f"tool {tool!r}: tenant {tenant!r} already has {held} calls of synchronous tools running "
                "(some may be past their deadline); try again when they finish"
            )
        self._held[tenant] = held + 1
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
        work = self._pool.submit(call)
        home = threading.get_ident()

        def given_back(_: object) -> None:
            # When the thread is done, or at once when queued work is cancelled (its deadline):
            # that happens on the loop's own thread.
            if threading.get_ident() == home:
                self._release(tenant)
                return
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing is counted any more
                loop.call_soon_threadsafe(self._release, tenant)

        work.add_done_callback(given_back)
        return await asyncio.wrap_future(work)

    def _release(self, tenant: str) -> None:
        left = self._held[tenant] - 1
        if left:
            self._held[tenant] = left
        else:
            del self._held[tenant]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
