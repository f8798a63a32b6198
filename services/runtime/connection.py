"""nats-py's client with two shortcuts on the per-message path.

A message through a nats-py service takes five event-loop turns from socket to socket: the read
loop parses it and queues it on the subscription, the subscription's task takes it and starts the
handler's task, the handler publishes into the pending buffer and wakes the flusher task, which
writes. With one request in flight each turn is pure latency, on every hop of a run.

- **Direct dispatch**: for subscriptions registered with :meth:`Connection.dispatch_directly`,
  the read loop hands the message straight to a synchronous callback (which starts the handler's
  task, or resolves a request's future). The callback may decline (the service is at its
  in-flight limit) and the message then takes nats-py's queued path, which is also the path
  whenever messages are already queued on the subscription, so none overtakes another and
  back-pressure is unchanged. When that message was the last one read, the read loop yields
  once, so the handler runs (and answers) before the loop goes back to waiting on the socket.
- **Direct write**: the first publish of a loop turn is written to the socket at once when
  nothing is pending or buffered before it and the owner holds at most one message
  (:attr:`Connection.quiet`); other publishes go to the pending buffer and the flusher writes
  them together, so under load writes are still batched.

Both use nats-py internals, checked on 2.16 (pyproject.toml pins nats-py to that minor version).
:data:`AVAILABLE` says whether this nats-py has them (a test fails loudly if an upgrade loses
them); ``CORRAL_CONNECTION_SHORTCUTS=off`` turns them off, and the client then behaves exactly as
nats-py's. CI runs the integration and security tests in both modes, so an upgrade that changes
what the internals do, not only their names, fails too. Measured with ``corral bench``; see
docs/performance.md.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from nats.aio import client as nats_client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.aio.transport import TcpTransport
from nats.protocol import command as protocol

DirectCallback = Callable[[Msg], bool]

AVAILABLE = all(
    hasattr(nats_client.Client, name) for name in ("_process_msg", "_build_message", "_process_headers", "_remove_sub")
) and hasattr(nats_client, "_validate_subject")


def enabled() -> bool:
    """``CORRAL_CONNECTION_SHORTCUTS``: on unless set to off (read from the environment, not the
    services' settings: the Python client uses this module too)."""
    value = os.environ.get("CORRAL_CONNECTION_SHORTCUTS", "on").strip().lower()
    if value not in ("on", "off", "1", "0", "true", "false"):
        raise SystemExit(f"error: CORRAL_CONNECTION_SHORTCUTS must be on or off, not {value!r}")
    return value in ("on", "1", "true")


SHORTCUTS = AVAILABLE and enabled()


class Connection(nats_client.Client):
    """A nats-py client; connect it with ``await Connection().connect(url, **options)``."""

    def __init__(self) -> None:
        super().__init__()
        self._direct: dict[int, DirectCallback] = {}
        self._wrote_this_turn = False
        # Whether the owner has at most one message in hand (then a write is not worth batching).
        self.quiet: Callable[[], bool] = lambda: True

    def dispatch_directly(self, subscription: Subscription, callback: DirectCallback) -> None:
        """Hand ``subscription``'s messages to ``callback`` from the read loop.

        ``callback`` runs inside the read loop: it must not block, and returns False to leave the
        message to the subscription's own callback (queued, as nats-py does)."""
        if SHORTCUTS and subscription._max_msgs == 0 and isinstance(getattr(self._ps, "buf", None), bytearray):
            self._direct[subscription._id] = callback

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:  # unsubscribe and drain end here
        self._direct.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        callback = self._direct.get(sid)
        if callback is not None:
            sub = self._subs.get(sid)
            if sub is None:  # removed another way (a closed connection): forget it
                del self._direct[sid]
                return
            if sub._pending_queue.empty():
                msg = self._build_message(sid, subject, reply, data, await self._process_headers(headers))
                try:
                    taken = callback(msg)
                except Exception as error:  # a callback's bug must not end the read loop
                    await self._error_cb(error)
                    taken = True  # it may have acted on the message: never hand it out twice
                if taken:
                    self.stats["in_msgs"] += 1
                    self.stats["in_bytes"] += len(data)
                    sub._received += 1
                    if not self._ps.buf:
                        # The last message read: let the handler run (and answer) before the read
                        # loop finishes its turn and waits for the socket again.
                        await asyncio.sleep(0)
                    return
        await super()._process_msg(sid, subject, reply, data, headers)

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        if (
            headers is None
            and not self._wrote_this_turn
            and not self._pending
            and self.quiet()
            and self._status == nats_client.Client.CONNECTED
            and len(payload) <= self._max_payload
            and SHORTCUTS
            and isinstance(self._transport, TcpTransport)
        ):
            writer = self._transport._io_writer
            if writer is not None and writer.transport.get_write_buffer_size() == 0:
                nats_client._validate_subject(subject)
                if reply:
                    nats_client._validate_subject(reply)
                try:
                    writer.write(protocol.pub_cmd(subject, reply, payload))
                except (OSError, RuntimeError):  # the socket is going away: nats-py's path handles that
                    return await super().publish(subject, payload, reply, headers)
                self.stats["out_msgs"] += 1
                self.stats["out_bytes"] += len(payload)
                self._wrote_this_turn = True
                asyncio.get_running_loop().call_soon(self._next_turn)
                return
        await super().publish(subject, payload, reply, headers)

    def _next_turn(self) -> None:
        self._wrote_this_turn = False


async def connect(url: str, **options: Any) -> Connection:
    """``nats.connect`` returning a :class:`Connection`."""
    connection = Connection()
    await connection.connect(url, **options)
    return connection
