"""Whether any replica of another service is running, as the broker last said.

A service that passes requests on with the requester's reply subject (the router hands runs to
the executor this way) never hears back from the broker when nothing serves the subject: the
no-responders status goes to a subscriber of the reply subject on the *publishing* connection,
and the requester's inbox is not one. So the router probes the executor's ping subject in the
background: a no-responders answer to its own probe is the broker saying, with authority, that
no replica is subscribed. While that is the last word, requests go the long way (a request and a
relayed reply), which fails at once with a typed error instead of waiting out the deadline.

A replica that stops says so first, on ``corral.leaving.<service>`` (Service.stop: a request,
which each watcher answers; no responders means nothing watches it), and keeps taking messages
until :data:`LEAVING_GRACE_S` has passed. On that notice the watcher takes the long way at once
and probes again: if another replica answers, requests are passed on directly again. So
the last replica's stop no longer leaves a window of up to ``interval_s`` in which requests were
passed on to nobody and their clients waited out their deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from nats.errors import NoRespondersError

from contracts import subjects
from services.runtime.tasks import cancel_and_wait

# How long a stopping replica goes on taking messages after its leaving notice: time for every
# watcher to hear it and take the long way (one delivery; a probe's answer is not waited for).
LEAVING_GRACE_S = 0.25


class Liveness:
    """Probes ``corral.ping.<service>`` every ``interval_s`` seconds."""

    def __init__(self, service: str, interval_s: float) -> None:
        self.service = service
        self.interval_s = interval_s
        # Until a replica has answered once, nothing is assumed about it.
        self.up = False
        self.changed = asyncio.Event()  # set on every change of ``up`` (tests wait on it)
        self.unanswered = 0  # probes that got no answer at all
        self.notices = 0  # leaving notices heard
        self._doubted_until = 0.0  # after a leaving notice: what relayed requests say is not news
        self._probe_now = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._leaving: Any = None

    def start(self, nc: Any) -> None:
        self._task = asyncio.create_task(self._run(nc), name=f"liveness-{self.service}")

    async def listen(self, nc: Any) -> None:
        """Hear the service's replicas' leaving notices (once connected, before serving)."""
        self._leaving = await nc.subscribe(subjects.leaving(self.service), cb=self._heard_leaving)

    async def _heard_leaving(self, msg: Any) -> None:
        """A replica is stopping: the long way until a probe sent after this notice finds another
        replica. A probe that was already out says nothing (the stopping replica may have
        answered it), nor, until its grace is surely over, does a relayed request's answer (the
        stopping replica still answers them during its grace)."""
        self.notices += 1
        self._doubted_until = time.monotonic() + 2 * LEAVING_GRACE_S
        self._set(False)
        self._probe_now.set()
        if msg is not None and msg.reply:  # taken note of: the leaving replica need not wait its whole grace
            with contextlib.suppress(Exception):
                await msg.respond(b"")

    async def stop(self) -> None:
        if self._leaving is not None:
            with contextlib.suppress(Exception):
                await self._leaving.unsubscribe()
        if self._task is not None:
            await cancel_and_wait(self._task)  # its requests can lose one cancellation (tasks.py)

    def saw(self, up: bool) -> None:
        """Record what a relayed request's answer said (the router's handler): an executor
        answered. Not after a leaving notice, until a probe has looked again."""
        if not (up and time.monotonic() < self._doubted_until):
            self._set(up)

    def _probed(self, up: bool, heard: int) -> None:
        """A probe's answer; ``heard``: the notices heard when it was sent."""
        if heard == self.notices:  # no replica said it was leaving while this probe was out
            self._set(up)

    def _set(self, up: bool) -> None:
        if up != self.up:
            self.up = up
            self.changed.set()

    async def _run(self, nc: Any) -> None:
        subject = subjects.ping(self.service)
        while True:
            self._probe_now.clear()
            heard = self.notices
            try:
                await nc.request(subject, b"", timeout=max(self.interval_s, 1.0))
            except NoRespondersError:
                self._probed(False, heard)
            except Exception:  # a timeout (overloaded) or a reconnection: no new information
                self.unanswered += 1
            else:
                self._probed(True, heard)
            with contextlib.suppress(TimeoutError):  # the interval, or a leaving notice
                async with asyncio.timeout(self.interval_s):
                    await self._probe_now.wait()


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
