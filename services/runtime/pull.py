"""A durable pull consumer whose messages are handled as they arrive.

nats-py's ``fetch(n)`` returns when it holds ``n`` messages, or at its timeout: a pull request
for more messages than are waiting keeps the first ones until then. With a fetch of up to 64 and
a 5 s timeout, a run's wake-up waited up to 5 s in the replica that had it (measured: runs whose
start went through the work queue took 5 s instead of milliseconds). Here a pull request asks for
as many messages as the replica has free slots, and each message is started the moment it arrives;
the next request goes out when this one is fulfilled, expires (the broker's 408), or the
connection comes back from a reconnection (the request stayed with the old one; a request that
gets no answer by its expiry is taken as lost too). Status messages are the JetStream pull protocol's
(ADR-13): 100 heartbeat, 404 no messages, 408 expired, 409 refused (max waiting, consumer gone).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import Header

from services.runtime.slots import Slots

# How long one pull request waits on the broker for messages before it expires.
PULL_EXPIRES_S = 5.0
# A request the broker did not end by its expiry and this much more is taken as lost.
LOST_AFTER_S = 1.0
# After a 409 (the consumer is gone, or too many requests wait on it): how long until the next.
REFUSED_BACKOFF_S = 0.5
STATUS_HEARTBEAT = "100"


class PullConsumer:
    """Pulls ``stream``/``durable`` on ``nc`` while :meth:`run` runs, ``start(msg)`` for each
    message with one of ``slots`` taken for it (``give_back()`` returns a slot not used)."""

    def __init__(
        self,
        nc: Any,
        stream: str,
        durable: str,
        *,
        slots: Slots,
        start: Callable[[Msg], None],
        give_back: Callable[[], None],
        most: int,
        log: Any,
        expires_s: float = PULL_EXPIRES_S,
    ) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._slots, self._start, self._give_back = slots, start, give_back
        self._most = most
        self._log = log
        self._expires_s = expires_s
        self._wanted = 0  # messages the open request may still deliver (a slot taken for each)
        self._ended = asyncio.Event()  # the open request is fulfilled, expired or refused
        self._refused: str | None = None

    async def run(self) -> None:
        inbox = self._nc.new_inbox()
        subscription = await self._nc.subscribe(inbox, cb=self._on_message)
        try:
            while True:
                await self._slots.take()
                wanted = 1
                while wanted < self._most and self._slots.try_take():
                    wanted += 1
                self._wanted, self._refused = wanted, None
                self._ended.clear()
                request = {"batch": wanted, "expires": int(self._expires_s * 1e9)}
                try:
                    await self._nc.publish(self._next, json.dumps(request).encode(), reply=inbox)
                    async with asyncio.timeout(self._expires_s + LOST_AFTER_S):
                        await self._ended.wait()
                except TimeoutError:
                    pass  # no answer: the request was lost (a reconnection); ask again
                except Exception as error:  # disconnected: publishing fails until reconnected
                    self._log.warning("durable_pull_failed", consumer=self._next, error=str(error))
                    await asyncio.sleep(REFUSED_BACKOFF_S)
                finally:
                    for _ in range(self._wanted):
                        self._give_back()
                    self._wanted = 0
                if self._refused is not None:
                    self._log.warning("durable_pull_refused", consumer=self._next, status=self._refused)
                    await asyncio.sleep(REFUSED_BACKOFF_S)
        finally:
            await subscription.unsubscribe()

    def reconnected(self) -> None:
        """The connection is back (perhaps to another node): the open request went with the old
        one, so the next is asked for now rather than when this one would have expired."""
        self._ended.set()

    async def _on_message(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(Header.STATUS) if headers else None
        if status is not None and not msg.data:
            if status == STATUS_HEARTBEAT:
                return
            if status.startswith("409"):
                self._refused = f"{status} {headers.get(Header.DESCRIPTION, '')}".strip()
            self._ended.set()  # 404, 408 (expired) or 409: this request is over
            return
        if self._wanted > 0:
            self._wanted -= 1
            self._start(msg)
            if self._wanted == 0:
                self._ended.set()
        elif self._slots.try_take():  # a late delivery of a request taken as lost
            self._start(msg)
        else:
            await msg.nak()  # no room: the broker hands it out again at once
