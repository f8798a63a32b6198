"""Request/reply over one wildcard inbox subscription, with less work per request than nats-py's.

nats-py's ``request`` draws a random token per request (a ``getrandom`` call), decodes it three
times and waits through ``asyncio.wait_for`` (an extra future, callbacks and a timer). Here a
request is a counter, one future and one timer. Replies arrive on
``<inbox prefix>.<random per connection>.<counter>``: the random part keeps replies of an earlier
connection apart, and only the holder of the inbox prefix may subscribe to it (broker
permissions), so a predictable counter reveals nothing. Request/reply is on every hop of a run,
so this is measured on the hot path (``corral bench``).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import Header

from services.runtime.connection import Connection

NO_RESPONDERS = "503"


class ReplyLost(NatsTimeout):
    """The connection dropped while the request waited: a reply sent meanwhile is lost, so it
    is not waited for until the timeout (a step's default is 30 s). A nats-py timeout to every
    caller that handles one; the request may or may not have been handled."""


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(NatsTimeout())


class Requester:
    """Requests on one connection; :meth:`start` once connected."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._prefix = ""
        self._pending: dict[str, asyncio.Future[Msg]] = {}
        self._counter = itertools.count(1)
        self._subscription: Any = None

    async def start(self) -> None:
        self._prefix = f"{self._nc.new_inbox()}."
        self._subscription = await self._nc.subscribe(f"{self._prefix}*", cb=self._on_reply)
        if isinstance(self._nc, Connection):  # replies resolve their request from the read loop
            self._nc.dispatch_directly(self._subscription, self._take_reply)

    async def stop(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None

    def connection_lost(self) -> None:
        """Fail every request waiting for its reply (the connection's ``disconnected_cb``)."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ReplyLost())

    def quiet(self) -> bool:
        """At most one request waiting for its reply."""
        return len(self._pending) <= 1

    async def request(self, subject: str, payload: bytes, timeout: float, headers: dict[str, str] | None = None) -> Msg:
        """Publish ``payload`` (with ``headers``, if any) with a reply subject and return the
        reply; raises nats-py's ``TimeoutError`` or ``NoRespondersError`` as ``nc.request`` does."""
        loop = asyncio.get_running_loop()
        token = str(next(self._counter))
        future: asyncio.Future[Msg] = loop.create_future()
        self._pending[token] = future
        timer = loop.call_later(timeout, _expire, future)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            msg = await future
        finally:
            timer.cancel()
            self._pending.pop(token, None)
        headers = msg.headers
        if headers and not msg.data and headers.get(Header.STATUS) == NO_RESPONDERS:
            raise NoRespondersError
        return msg

    async def _on_reply(self, msg: Msg) -> None:
        self._take_reply(msg)

    def _take_reply(self, msg: Msg) -> bool:
        future = self._pending.get(msg.subject[len(self._prefix) :])
        if future is not None and not future.done():
            future.set_result(msg)
        return True
