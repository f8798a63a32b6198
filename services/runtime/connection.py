"""nats-py's client with two shortcuts on the per-message path, and a read loop no message stops.

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
them); ``CORRAL_CONNECTION_SHORTCUTS=off`` turns them off, and the client then behaves as
nats-py's, but for the guard below. CI runs the tests of every message path in both modes (``.ci/run``), so
an upgrade that changes what the internals do, not only their names, fails too. Measured with
``corral bench``; see docs/performance.md.

In both modes, **no frame ends the read loop.** nats-py parses each message inside it, and a
message it cannot read (a header block such as ``NATS/1.0`` with no line end or a status that is
not UTF-8, a reply subject that is not UTF-8: any publisher can make the broker deliver one)
raised there, and the connection then read nothing more. Such a message is now dropped, counted in
``stats["malformed_frames"]`` and reported to the error callback as a :class:`MalformedFrame`: the
first of a burst at once, then at most one summary a second. Its parser also splits message lines
where the broker does (a subject may hold a vertical tab or a form feed), with nats-py's own
parsing code. Neither costs anything on the success path: a ``try`` costs nothing until it catches
(Python 3.11), and the patterns are as cheap as nats-py's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import types
from collections.abc import Callable
from typing import Any

from nats import errors as nats_errors
from nats.aio import client as nats_client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.aio.transport import TcpTransport
from nats.protocol import command as protocol
from nats.protocol import parser as parser_module
from nats.protocol.parser import Parser

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

# Unreadable messages are reported the first of a burst at once, then in one summary this often.
REPORT_INTERVAL_S = 1.0

_logger = logging.getLogger(__name__)


class MalformedFrame(nats_errors.Error):
    """Messages the connection could not read and dropped, as the error callback receives them:
    the first of a burst (``count`` 1), or a summary of the ``count`` dropped since."""

    def __init__(self, count: int, subject: str, reason: str, *, summary: bool = False) -> None:
        super().__init__(count, subject, reason)
        self.count = count
        self.subject = subject
        self.reason = reason
        self.summary = summary

    def __str__(self) -> str:
        if self.summary:
            return (
                f"nats: dropped {self.count} more messages it could not read in the last"
                f" {REPORT_INTERVAL_S:g} s (the last on {self.subject!r}: {self.reason})"
            )
        return f"nats: dropped a message it could not read on {self.subject!r}: {self.reason}"


def _printable(raw: bytes, limit: int = 120) -> str:
    """Publisher-chosen bytes, safe and short enough for a log line."""
    text = raw[:limit].decode("utf-8", "backslashreplace")
    return text + "..." if len(raw) > limit else text


# nats-py 2.16 splits message lines on ``\s``, which also matches the vertical tab and form feed
# that a subject or reply subject may hold: the broker separates fields with spaces (and accepts
# tabs), nothing else. Such a line made nats-py raise (a reconnect, losing what it held), wait for
# ever with 4 KiB behind it, or read it wrong: a piece of the reply, or a piece of the subject as
# the subscription id, so the message went to another subscription. These patterns have nats-py's
# groups and split where the broker does.
_NATS_PY_PATTERNS = {  # as nats/protocol/parser.py writes them (with a real CR LF)
    "MSG_RE": b"\\AMSG\\s+([^\\s]+)\\s+([^\\s]+)\\s+(([^\\s]+)[^\\S\r\n]+)?(\\d+)\r\n",
    "HMSG_RE": b"\\AHMSG\\s+([^\\s]+)\\s+([^\\s]+)\\s+(([^\\s]+)[^\\S\r\n]+)?([\\d]+)\\s+(\\d+)\r\n",
}
_TOKEN = rb"([^ \t\r\n]+)"
_BROKER_PATTERNS = {
    "MSG_RE": re.compile(rb"\AMSG[ \t]+%s[ \t]+%s[ \t]+(%s[ \t]+)?(\d+)\r\n" % (_TOKEN, _TOKEN, _TOKEN)),
    "HMSG_RE": re.compile(rb"\AHMSG[ \t]+%s[ \t]+%s[ \t]+(%s[ \t]+)?(\d+)[ \t]+(\d+)\r\n" % (_TOKEN, _TOKEN, _TOKEN)),
}


def _broker_split_parse() -> Callable[..., Any] | None:
    """nats-py's own ``Parser.parse``, run with the broker's message-line patterns (not a copy of
    its code, and nats-py's module is left as it is); None if this nats-py's patterns are not the
    ones known, so an upgrade gets nats-py's parser, and a test says so."""
    known = (getattr(getattr(parser_module, name, None), "pattern", None) for name in _NATS_PY_PATTERNS)
    if list(known) != list(_NATS_PY_PATTERNS.values()):
        return None
    parse = Parser.parse
    names = {**vars(parser_module), **_BROKER_PATTERNS}
    return types.FunctionType(parse.__code__, names, parse.__name__, parse.__defaults__, parse.__closure__)


_parse = _broker_split_parse()
SPLITS_AS_THE_BROKER = _parse is not None


class _Parser(Parser):
    """nats-py's parser, reading message lines as the broker wrote them."""

    if _parse is not None:
        parse = _parse


class Connection(nats_client.Client):
    """A nats-py client; connect it with ``await Connection().connect(url, **options)``."""

    def __init__(self) -> None:
        super().__init__()
        self._ps = _Parser(self)  # reset, never replaced, by nats-py on reconnect
        self._direct: dict[int, DirectCallback] = {}
        self._wrote_this_turn = False
        # Whether the owner has at most one message in hand (then a write is not worth batching).
        self.quiet: Callable[[], bool] = lambda: True
        self.stats["malformed_frames"] = 0
        self._report_window: asyncio.TimerHandle | None = None  # set while a burst is reported
        self._unreported = 0
        self._last_dropped = ("", "")
        self._reporting: set[asyncio.Task[None]] = set()
        # Told of each message dropped as unreadable: (subscription id, subject, reply), so its
        # owner can answer it with a typed error where the reply subject itself is readable.
        self.on_unreadable: Callable[[int, bytes, bytes], None] | None = None

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
        try:
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
        except Exception as error:  # one message must not end the read loop (costs only when raised)
            await self._drop(subject, error)
            if self.on_unreadable is not None:
                try:
                    self.on_unreadable(sid, subject, reply)
                except Exception:  # nor may its owner's hook
                    _logger.exception("the unreadable-message hook failed")

    async def _drop(self, subject: bytes, error: Exception) -> None:
        """Count a message that could not be read; report the first of a burst, summarise the rest."""
        self.stats["malformed_frames"] += 1
        self._last_dropped = (_printable(subject), f"{type(error).__name__}: {error}"[:200])
        if self._report_window is not None:
            self._unreported += 1
            return
        self._report_window = asyncio.get_running_loop().call_later(REPORT_INTERVAL_S, self._end_report_window)
        await self._report(MalformedFrame(1, *self._last_dropped))

    def _end_report_window(self) -> None:
        if not self._unreported or self.is_closed:
            self._report_window = None  # a quiet interval: the next one is reported at once
            return
        count, self._unreported = self._unreported, 0
        loop = asyncio.get_running_loop()
        self._report_window = loop.call_later(REPORT_INTERVAL_S, self._end_report_window)
        task = loop.create_task(self._report(MalformedFrame(count, *self._last_dropped, summary=True)))
        self._reporting.add(task)
        task.add_done_callback(self._reporting.discard)

    async def _report(self, error: MalformedFrame) -> None:
        try:
            await self._error_cb(error)
        except Exception:  # nor may the owner's error callback
            _logger.exception("the error callback failed on %s", error)

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


def quick_reconnects(first_s: float, most_s: float = 2.0) -> Callable[[list[Any], dict[str, Any]], tuple[Any, float]]:
    """nats-py's ``reconnect_to_server_handler``: the next attempt goes to the server tried least
    since it last worked, after a short wait that doubles per failed attempt up to ``most_s``,
    jittered (0.5x to 1.5x) so that clients which lost the broker together do not return together.

    nats-py's own wait is a flat ``reconnect_time_wait`` (2 s) after every failure: after a broker
    restart a tenant refused once (its auth callout was not back yet) then waited 2 s more. The
    services' first attempt is at once (``first_s=0``): the auth service is back before tenants,
    whose first attempt waits ``first_s``.
    """

    def choose(servers: list[Any], info: dict[str, Any]) -> tuple[Any, float]:
        if not servers:
            return None, 0.0
        server = min(servers, key=lambda candidate: candidate.reconnects)
        base = first_s if server.reconnects == 0 else max(first_s, 0.05) * 2**server.reconnects
        return server, min(most_s, base) * random.uniform(0.5, 1.5)

    return choose
