"""Whether any replica of another service is running, as the broker last said.

A service that passes requests on with the requester's reply subject (the router hands runs to
the executor this way) never hears back from the broker when nothing serves the subject: the
no-responders status goes to a subscriber of the reply subject on the *publishing* connection,
and the requester's inbox is not one. So the router probes the executor's ping subject in the
background: a no-responders answer to its own probe is the broker saying, with authority, that
no replica is subscribed. While that is the last word, requests go the long way (a request and a
relayed reply), which fails at once with a typed error instead of waiting out the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from nats.errors import NoRespondersError

from contracts import subjects
from services.runtime.tasks import cancel_and_wait


class Liveness:
    """Probes ``corral.ping.<service>`` every ``interval_s`` seconds."""

    def __init__(self, service: str, interval_s: float) -> None:
        self.service = service
        self.interval_s = interval_s
        # Until a replica has answered once, nothing is assumed about it.
        self.up = False
        self.changed = asyncio.Event()  # set on every change of ``up`` (tests wait on it)
        self.unanswered = 0  # probes that got no answer at all
        self._task: asyncio.Task[None] | None = None

    def start(self, nc: Any) -> None:
        self._task = asyncio.create_task(self._run(nc), name=f"liveness-{self.service}")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)  # its requests can lose one cancellation (tasks.py)

    def saw(self, up: bool) -> None:
        """Record what the broker or the service said (also called when a request went through)."""
        if up != self.up:
            self.up = up
            self.changed.set()

    async def _run(self, nc: Any) -> None:
        subject = subjects.ping(self.service)
        while True:
            try:
                await nc.request(subject, b"", timeout=max(self.interval_s, 1.0))
            except NoRespondersError:
                self.saw(False)
            except Exception:  # a timeout (overloaded) or a reconnection: no new information
                self.unanswered += 1
            else:
                self.saw(True)
            await asyncio.sleep(self.interval_s)


class Replicas:
    """How many replicas of this service are running, counted every ``interval_s`` seconds from
    the answers to one ping (each replica answers with its own id). A service that shares a
    per-tenant limit between its replicas (the router's rate limit) divides by it."""

    def __init__(self, service: str, interval_s: float, *, window_s: float = 0.25) -> None:
        self.service = service
        self.interval_s = interval_s
        self.window_s = window_s
        self.count = 1  # this one, until the first count
        self.counted = asyncio.Event()  # set after each count (tests wait on it)
        self._task: asyncio.Task[None] | None = None

    def start(self, nc: Any) -> None:
        self._task = asyncio.create_task(self._run(nc), name=f"replicas-{self.service}")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)  # its requests can lose one cancellation (tasks.py)

    async def _run(self, nc: Any) -> None:
        subject = subjects.ping(self.service)
        while True:
            with contextlib.suppress(Exception):  # a reconnection: keep the last count
                self.count = max(1, await self._count(nc, subject))
                self.counted.set()
            await asyncio.sleep(self.interval_s)

    async def _count(self, nc: Any, subject: str) -> int:
        inbox = nc.new_inbox()
        seen: set[str] = set()

        async def answer(msg: Any) -> None:
            if msg.data:  # an empty message is the broker's "no responders"
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    seen.add(str(json.loads(msg.data)["replica"]))

        subscription = await nc.subscribe(inbox, cb=answer)
        try:
            await nc.publish(subject, b"", reply=inbox)
            await asyncio.sleep(self.window_s)  # the answers of this round arrive meanwhile
        finally:
            await subscription.unsubscribe()
        return len(seen)
