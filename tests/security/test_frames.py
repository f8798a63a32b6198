"""Layer 2, the connection: no frame the broker delivers stops a service's connection.

nats-py 2.16 parses each message's header block (and each message line) inside its read loop. A
header block it cannot read used to end that loop: the connection stayed open, read nothing more,
and the service answered nobody until restarted. Any tenant can make the broker deliver such a
frame: it only has to write the protocol itself (``HPUB``) on its own subject. Every case here goes
through a real broker, from a raw socket, to a :class:`~services.runtime.connection.Connection`
with its shortcuts on and off.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import nats
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from contracts import subjects
from services.auth.tokens import mint_dev_token
from services.runtime import connection
from tests.security.conftest import still_serving

VALID_HEADERS = b"NATS/1.0\r\nKey: Value\r\n\r\n"


@dataclass(frozen=True)
class Frame:
    """One message as a publisher writes it: a header block (HPUB, or PUB when None) and a reply."""

    headers: bytes | None
    reply: bytes = b""
    payload: bytes = b"x"

    def encode(self, subject: bytes, payload: bytes | None = None) -> bytes:
        payload = self.payload if payload is None else payload
        reply = b" " + self.reply if self.reply else b""
        if self.headers is None:
            return b"PUB %s%s %d\r\n%s\r\n" % (subject, reply, len(payload), payload)
        size = len(self.headers) + len(payload)
        return b"HPUB %s%s %d %d\r\n%s%s\r\n" % (subject, reply, len(self.headers), size, self.headers, payload)


# Frames nats-py raises on in its read loop: the connection drops and counts them.
UNREADABLE = {
    "version line with no line end": Frame(b"NATS/1.0"),
    "shorter than the version line": Frame(b"N"),
    "a bare line end": Frame(b"\r\n"),
    "status that is not UTF-8": Frame(b"NATS/1.0 \xff\xfe\xfd\r\n\r\n"),
    "status cut inside a UTF-8 sequence": Frame(b"NATS/1.0 \xe2\x82\r\n\r\n"),
    "status description that is not UTF-8": Frame(b"NATS/1.0 503 \xff\xfe\r\n\r\n"),
    "status description line that is not UTF-8": Frame(b"NATS/1.0 100 Idle\xff\r\nKey: v\r\n\r\n"),
    "reply subject that is not UTF-8": Frame(VALID_HEADERS, reply=b"_INBOX.acme.\xff\xfe"),
    "reply subject that is not UTF-8, no headers": Frame(None, reply=b"_INBOX.acme.\xc3"),
}
# Odd frames nats-py reads (it skips what it cannot parse): they reach the subscriber as they are.
READABLE = {
    "no header lines": Frame(b"NATS/1.0\r\n\r\n"),
    "an empty header block": Frame(b""),
    "a header line without a colon": Frame(b"NATS/1.0\r\nno colon here\r\n\r\n"),
    "a value that is not UTF-8": Frame(b"NATS/1.0\r\nKey: \xff\xfe\r\n\r\n"),
    "a name that is not ASCII": Frame(b"NATS/1.0\r\n\xc3\xa9: v\r\n\r\n"),
    "NUL bytes": Frame(b"NATS/1.0\r\n\x00: \x00\r\n\r\n"),
    "no version line": Frame(b"\xff\xfegarbage"),
    "a status line with garbage": Frame(b"NATS/1.0 5x3 what\r\n\r\n"),
    "bare line feeds": Frame(b"NATS/1.0\nKey: Value\n\n"),
    "a 32 KiB value": Frame(b"NATS/1.0\r\nKey: " + b"v" * 32768 + b"\r\n\r\n"),
    "a thousand header lines": Frame(b"NATS/1.0\r\n" + b"".join(b"K%d: v\r\n" % i for i in range(1000)) + b"\r\n"),
}
# Subjects and reply subjects the broker takes (it splits fields on spaces and tabs only) that
# nats-py's message-line pattern splits (``\s`` also matches vertical tab and form feed): it raised
# (a reconnect), waited for ever (4 KiB or more behind the line), or read a piece of the reply, or
# a piece of the subject as the subscription id. Each is sent on the subscriber's subject and on
# ``<subject>.a\x0b1``, which nats-py read as sid 1 (another subscription) with reply "2".
MIS_SPLIT = {
    "no reply": Frame(VALID_HEADERS),
    "no reply, no headers": Frame(None),
    "a vertical tab in the reply": Frame(VALID_HEADERS, reply=b"_INBOX.acme.a\x0bb"),
    "a form feed in the reply": Frame(VALID_HEADERS, reply=b"_INBOX.acme.a\x0c9"),
    "a reply ending in a vertical tab, no headers": Frame(None, reply=b"_INBOX.acme.\x0b"),
    "a reply starting with a vertical tab": Frame(VALID_HEADERS, reply=b"\x0b_INBOX.acme.x"),
    "a vertical tab in the reply, 8 KiB behind it": Frame(VALID_HEADERS, reply=b"_INBOX.a\x0bb", payload=b"p" * 8192),
    "a form feed in the reply, no headers, 8 KiB": Frame(None, reply=b"_INBOX.a\x0c5", payload=b"p" * 8192),
}


class RawPublisher:
    """A client that writes the protocol by hand, as any tenant may."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str, token: str | None = None) -> RawPublisher:
        address = urlsplit(url)
        reader, writer = await asyncio.open_connection(address.hostname, address.port)
        await reader.readline()  # INFO
        options: dict[str, object] = {"verbose": False, "pedantic": False, "headers": True, "protocol": 1}
        if token is not None:
            options["auth_token"] = token
        writer.write(b"CONNECT " + json.dumps(options).encode() + b"\r\n")
        publisher = cls(reader, writer)
        await publisher.round_trip()  # the broker accepted the connection
        return publisher

    def send(self, frame: Frame, subject: bytes, payload: bytes | None = None) -> None:
        self.writer.write(frame.encode(subject, payload))

    async def round_trip(self) -> None:
        """PING, then wait for the PONG: the broker has routed everything written before."""
        self.writer.write(b"PING\r\n")
        await self.writer.drain()
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 5)
            if line.startswith(b"PONG"):
                return
            if line.startswith(b"PING"):
                self.writer.write(b"PONG\r\n")
            elif not line or line.startswith(b"-ERR"):
                raise AssertionError(f"the broker refused the raw publisher: {line!r}")

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@dataclass
class Subscriber:
    """A connection answering requests on ``subject`` as a service does, and what it saw."""

    nc: connection.Connection
    requester: nats.NATS
    subject: str
    sids: dict[str, int] = field(default_factory=dict)  # its subscriptions: subject and wildcard
    received: list[Msg] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)

    def reports(self) -> list[Exception]:
        return [error for error in self.errors if isinstance(error, connection.MalformedFrame)]

    async def answers(self, subject: str | None = None) -> bool:
        reply = await self.requester.request(subject or self.subject, b"still there?", timeout=2)
        return reply.data == b"re:still there?"


@pytest.fixture(params=["shortcuts", "nats-py"])
def mode(request, monkeypatch) -> str:
    """Both modes in every run: the shortcuts on (direct dispatch) and off (nats-py's own path)."""
    if request.param == "shortcuts" and not connection.AVAILABLE:
        pytest.skip("this nats-py lacks what the shortcuts use")
    monkeypatch.setattr(connection, "SHORTCUTS", request.param == "shortcuts")
    return request.param


@pytest.fixture
async def subscriber(nats_url, mode) -> AsyncIterator[Subscriber]:
    async def on_error(error: Exception) -> None:
        watched.errors.append(error)

    subject = f"frames.{uuid.uuid4().hex}"
    nc = await connection.connect(nats_url, error_cb=on_error, max_reconnect_attempts=-1)
    watched = Subscriber(nc, await nats.connect(nats_url), subject)
    answering: set[asyncio.Task[None]] = set()

    async def answer(msg: Msg) -> None:
        if msg.reply:
            await msg.respond(b"re:" + msg.data)

    async def on_message(msg: Msg) -> None:
        watched.received.append(msg)
        await answer(msg)

    def take(msg: Msg) -> bool:  # what a service's direct callback does: start the handler's task
        watched.received.append(msg)
        task = asyncio.get_running_loop().create_task(answer(msg))
        answering.add(task)
        task.add_done_callback(answering.discard)
        return True

    sub = await nc.subscribe(subject, cb=on_message)
    wildcard = await nc.subscribe(f"{subject}.>", cb=on_message)
    nc.dispatch_directly(sub, take)
    nc.dispatch_directly(wildcard, take)
    watched.sids = {"subject": sub._id, "wildcard": wildcard._id}
    await nc.flush()
    await nc.flush()
    assert bool(nc._direct) == (mode == "shortcuts")
    try:
        yield watched
    finally:
        await watched.requester.close()
        await nc.close()


@pytest.fixture
async def publisher(nats_url) -> AsyncIterator[RawPublisher]:
    raw = await RawPublisher.connect(nats_url)
    try:
        yield raw
    finally:
        await raw.close()


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("frame", UNREADABLE.values(), ids=UNREADABLE.keys())
async def test_an_unreadable_frame_is_dropped_and_counted_and_the_connection_reads_on(subscriber, publisher, frame):
    for i in range(20):
        publisher.send(frame, subscriber.subject.encode(), b"bad-%d" % i)
    await publisher.round_trip()
    assert await subscriber.answers()
    assert [msg.data for msg in subscriber.received] == [b"still there?"]
    assert subscriber.nc.stats["malformed_frames"] == 20
    assert subscriber.nc.stats["reconnects"] == 0
    first = subscriber.reports()[0]
    assert (first.count, first.subject) == (1, subscriber.subject)
    assert len(subscriber.reports()) <= 2  # the first, then at most a summary of the rest


@pytest.mark.parametrize("frame", READABLE.values(), ids=READABLE.keys())
async def test_an_odd_but_readable_frame_reaches_the_subscriber(subscriber, publisher, frame):
    for i in range(5):
        publisher.send(frame, subscriber.subject.encode(), b"odd-%d" % i)
    await publisher.round_trip()
    assert await subscriber.answers()
    assert [msg.data for msg in subscriber.received] == [b"odd-%d" % i for i in range(5)] + [b"still there?"]
    assert subscriber.nc.stats["malformed_frames"] == 0
    assert subscriber.reports() == []


@pytest.mark.parametrize("frame", MIS_SPLIT.values(), ids=MIS_SPLIT.keys())
async def test_a_reply_subject_nats_py_would_mis_split_is_read_as_the_broker_sent_it(subscriber, publisher, frame):
    publisher.send(frame, subscriber.subject.encode())
    publisher.send(frame, f"{subscriber.subject}.a\x0b1".encode())
    await publisher.round_trip()
    assert await subscriber.answers()
    # In order per subscription; across the two, nats-py's own path gives each subscription a
    # task of its own, so the wildcard's message may come after the other's answer.
    await until(lambda: len(subscriber.received) == 3)
    reply, sids = frame.reply.decode(), subscriber.sids
    got = {
        name: [(msg.subject, msg.reply, msg.data) for msg in subscriber.received if msg._sid == sid]
        for name, sid in sids.items()
    }
    still_there = next(msg.reply for msg in subscriber.received if msg.data == b"still there?")
    assert got == {
        "subject": [(subscriber.subject, reply, frame.payload), (subscriber.subject, still_there, b"still there?")],
        "wildcard": [(f"{subscriber.subject}.a\x0b1", reply, frame.payload)],
    }
    assert subscriber.nc.stats["reconnects"] == 0
    assert subscriber.nc.stats["malformed_frames"] == 0


async def test_a_burst_is_reported_once_then_summarised(subscriber, publisher):
    frame = UNREADABLE["version line with no line end"]
    for _ in range(100):
        publisher.send(frame, subscriber.subject.encode())
    await publisher.round_trip()
    assert await subscriber.answers()
    await until(lambda: sum(report.count for report in subscriber.reports()) == 100)
    assert [report.count for report in subscriber.reports()] == [1, 99]
    assert "IndexError" in str(subscriber.reports()[0])
    assert "99 more" in str(subscriber.reports()[1])


@pytest.mark.usefixtures("mode")
async def test_a_steady_stream_of_bad_frames_is_reported_at_most_once_a_second(nats_url, publisher):
    errors: list[Exception] = []

    async def on_error(error: Exception) -> None:
        errors.append(error)

    nc = await connection.connect(nats_url, error_cb=on_error)
    try:
        subject = f"frames.{uuid.uuid4().hex}"
        await nc.subscribe(subject)
        await nc.flush()
        await nc.flush()
        started = time.monotonic()
        for _ in range(25):  # 2.5 s of them
            publisher.send(UNREADABLE["status that is not UTF-8"], subject.encode())
            await publisher.round_trip()
            await asyncio.sleep(0.1)
        await until(lambda: sum(getattr(error, "count", 0) for error in errors) == 25)
        elapsed = time.monotonic() - started
        assert nc.stats["malformed_frames"] == 25
        assert 2 <= len(errors) <= 2 + elapsed  # the first, then one summary a second
    finally:
        await nc.close()


@pytest.mark.usefixtures("mode")
async def test_an_error_callback_that_raises_does_not_end_the_read_loop(nats_url, publisher):
    async def on_error(error: Exception) -> None:
        raise RuntimeError("a bug in the owner's error callback")

    nc = await connection.connect(nats_url, error_cb=on_error)
    try:
        subject = f"frames.{uuid.uuid4().hex}"
        sub = await nc.subscribe(subject)
        await nc.flush()
        await nc.flush()
        publisher.send(UNREADABLE["a bare line end"], subject.encode())
        publisher.send(Frame(VALID_HEADERS), subject.encode(), b"after")
        await publisher.round_trip()
        assert (await sub.next_msg(timeout=2)).data == b"after"
        assert nc.stats["malformed_frames"] == 1
    finally:
        await nc.close()


# ---- fuzzing through the broker ------------------------------------------------------------


def _mutate(draw, block: bytes) -> bytes:
    data = bytearray(block)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["replace", "insert", "delete", "cut"]))
        if edit == "cut":
            del data[at:]
        elif edit == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            piece = draw(FRAGMENTS | st.binary(min_size=1, max_size=3))
            data[at : at + (len(piece) if edit == "replace" else 0)] = piece
    return bytes(data)


FRAGMENTS = st.sampled_from(
    [b"NATS/1.0", b" ", b"\r\n", b"\r", b"\n", b":", b": ", b"503", b"100", b"Idle Heartbeat", b"\xff", b"\xc3",
     b"\xe2\x82", b"\x00", b"\x0b", b"Key", b"Value", b"Nats-Msg-Id"]
)  # fmt: skip
header_blocks = st.one_of(
    st.binary(max_size=120),
    st.lists(FRAGMENTS | st.binary(max_size=4), max_size=12).map(b"".join),
    st.composite(lambda draw: _mutate(draw, VALID_HEADERS))(),
    st.composite(lambda draw: _mutate(draw, b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Stream: 7\r\n\r\n"))(),
)
# Subject tokens and replies the broker takes: anything but its separators (and wildcards).
tokens = st.binary(min_size=1, max_size=12).filter(lambda b: not any(c in b for c in b" \t\r\n.*>"))
replies = st.just(b"") | st.binary(min_size=1, max_size=16).filter(lambda b: not any(c in b for c in b" \t\r\n"))


async def test_fuzzed_frames_never_stop_the_connection(subscriber, publisher):
    sent: list[tuple[bytes, bytes]] = []  # subject and reply, by payload number

    @settings(max_examples=200, deadline=None)
    @given(headers=st.none() | header_blocks, token=st.none() | tokens, reply=replies)
    def send(headers, token, reply):
        subject = subscriber.subject.encode() + (b"." + token if token else b"")
        payload = b"fuzz-%d" % len(sent)
        sent.append((subject, reply))
        publisher.send(Frame(headers, reply), subject, payload)

    started = time.monotonic()
    send()
    await publisher.round_trip()
    assert await subscriber.answers(), "the connection stopped reading"
    fuzzed = subscriber.received[:-1]
    dropped = subscriber.nc.stats["malformed_frames"]
    assert len(fuzzed) + dropped == len(sent)  # each frame read or counted, none lost, none twice
    for msg in fuzzed:  # and what was read is what was sent
        assert (msg.subject.encode(), msg.reply.encode()) == sent[int(msg.data.removeprefix(b"fuzz-"))]
    assert subscriber.nc.stats["reconnects"] == 0
    assert len(subscriber.reports()) <= 2 + (time.monotonic() - started)
    if dropped:
        assert subscriber.reports()[0].count == 1


# ---- the real router --------------------------------------------------------------------


async def test_a_malformed_request_to_the_router_stops_it_for_no_tenant(system):
    broker, services = system
    acme = await RawPublisher.connect(broker.url, token=mint_dev_token("acme", key=broker.secrets.dev_key))
    try:
        for frame in UNREADABLE.values():
            bad = frame if frame.reply else Frame(frame.headers, reply=b"_INBOX.acme.x", payload=frame.payload)
            acme.send(bad, subjects.router_request("acme", "dev").encode())
        for frame in MIS_SPLIT.values():
            acme.send(frame, subjects.router_request("acme", "dev").encode())
        await acme.round_trip()  # the broker took them all: acme may publish there
    finally:
        await acme.close()
    await still_serving(broker, "acme")
    await still_serving(broker, "globex")
    router = services["router"].nc
    assert router.stats["malformed_frames"] == len(UNREADABLE)
    assert router.stats["reconnects"] == 0


async def test_an_unreadable_request_with_a_readable_reply_subject_is_answered_with_a_typed_error(system):
    """Dropped and counted by the connection, and the router answers it (invalid_request) into the
    tenant's own inbox, as it answers any other refusal."""
    from contracts.errors import InvalidRequest
    from contracts.replies import decode_reply

    broker, services = system
    token = mint_dev_token("acme", key=broker.secrets.dev_key)
    listener = await nats.connect(broker.url, token=token, inbox_prefix=subjects.inbox_prefix("acme").encode())
    graph = await nats.connect(  # the service whose inbox a tenant aims at
        broker.url, user="graph", password=broker.secrets.passwords["graph"], inbox_prefix=b"_INBOX._graph"
    )
    acme = await RawPublisher.connect(broker.url, token=token)
    try:
        answers = await listener.subscribe("_INBOX.acme.unreadable")
        aimed = await graph.subscribe("_INBOX._graph.>")
        await listener.flush()
        await graph.flush()
        # A reply into a service's inbox is never answered, readable or not (sent first: had it been
        # answered, that answer would reach the broker before the one below).
        acme.send(Frame(b"NATS/1.0", reply=b"_INBOX._graph.x"), subjects.router_request("acme", "dev").encode())
        acme.send(Frame(b"NATS/1.0", reply=b"_INBOX.acme.unreadable"), subjects.router_request("acme", "dev").encode())
        await acme.round_trip()
        answer = await answers.next_msg(timeout=10)
        with pytest.raises(InvalidRequest, match="could not be read"):
            decode_reply(answer.data)
        await graph.flush()  # after the answer above: had the other been answered, it is here too
        assert aimed.pending_msgs == 0
    finally:
        await acme.close()
        await listener.close()
        await graph.close()
    (endpoint,) = services["router"].stats.snapshot(tenants=["acme"])["endpoints"]
    assert endpoint["tenants"]["acme"]["refusals"]["invalid_request"] >= 1
