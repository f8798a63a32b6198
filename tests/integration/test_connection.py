"""The connection shortcuts (direct dispatch, direct write) and the service's in-flight limit on
top of them, against a real broker."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from nats.errors import BadSubjectError

from contracts import subjects
from contracts.envelope import Kind, ToolCall, new_envelope_json
from contracts.replies import decode_reply
from services.runtime import connection
from services.runtime.connection import AVAILABLE, SHORTCUTS, SPLITS_AS_THE_BROKER, Connection, enabled
from services.runtime.manifest import Consume, Manifest
from services.runtime.requests import Requester
from services.runtime.service import Request, Service
from services.runtime.settings import Settings


def test_the_installed_nats_py_has_what_the_shortcuts_use():
    # Without them the client still works, as plain nats-py: this says an upgrade lost the speed.
    assert AVAILABLE


def test_the_installed_nats_py_has_the_message_line_patterns_the_parser_replaces():
    # Without them the parser is nats-py's, which misreads a subject holding a vertical tab.
    assert SPLITS_AS_THE_BROKER


def test_the_shortcuts_are_on_unless_the_setting_turns_them_off():
    assert enabled() == SHORTCUTS


def test_the_shortcut_setting_takes_on_or_off_only(monkeypatch):
    monkeypatch.setenv("CORRAL_CONNECTION_SHORTCUTS", "off")
    assert enabled() is False
    monkeypatch.setenv("CORRAL_CONNECTION_SHORTCUTS", "sometimes")
    with pytest.raises(SystemExit, match="on or off"):
        enabled()


# Tests of the shortcut path itself; the rest of this file (and every integration and security
# test) runs in both modes.
shortcuts_only = pytest.mark.skipif(not SHORTCUTS, reason="CORRAL_CONNECTION_SHORTCUTS=off")


@pytest.fixture
async def nc(nats_url):
    conn = await connection.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.close()


async def settle(*conns: Connection) -> None:
    """Once each connection's PONG is back, everything the server sent it before is parsed (two
    rounds: nats-py 2.16 writes a flush's PING ahead of commands still pending)."""
    for conn in conns:
        await conn.flush()
        await conn.flush()


@shortcuts_only
async def test_direct_dispatch_hands_messages_over_from_the_read_loop_in_order(nc):
    subject = f"direct.{uuid.uuid4().hex}"
    direct, queued = [], []

    async def on_message(msg):
        queued.append(msg.data)

    sub = await nc.subscribe(subject, cb=on_message)
    nc.dispatch_directly(sub, lambda msg: direct.append(msg.data) or True)
    for i in range(20):
        await nc.publish(subject, str(i).encode())
    await settle(nc)
    assert direct == [str(i).encode() for i in range(20)]
    assert queued == []
    assert sub._received == 20


@shortcuts_only
async def test_a_declined_message_takes_the_queued_path_and_none_overtakes_a_queued_one(nc):
    subject = f"declined.{uuid.uuid4().hex}"
    handled, direct = [], []
    release = asyncio.Event()
    declining = True

    async def on_message(msg):
        handled.append(msg.data)
        if msg.data == b"0":
            await release.wait()  # holds the subscription's task: later messages stay queued

    def take(msg):
        if declining:
            return False
        direct.append(msg.data)
        handled.append(msg.data)
        return True

    sub = await nc.subscribe(subject, cb=on_message)
    nc.dispatch_directly(sub, take)
    for i in range(3):
        await nc.publish(subject, str(i).encode())
    await settle(nc)
    declining = False
    await nc.publish(subject, b"3")  # 1 and 2 are still queued: 3 queues behind them
    await settle(nc)
    assert direct == []
    release.set()
    await sub.drain()
    assert handled == [b"0", b"1", b"2", b"3"]


@shortcuts_only
async def test_an_unsubscribed_subscription_is_forgotten(nc):
    subject = f"gone.{uuid.uuid4().hex}"
    seen = []
    sub = await nc.subscribe(subject)
    nc.dispatch_directly(sub, lambda msg: seen.append(msg) or True)
    await sub.unsubscribe()
    await nc.publish(subject, b"late")
    await settle(nc)
    assert seen == []
    assert sub._id not in nc._direct  # and its callback is dropped


async def test_direct_and_batched_writes_keep_the_publish_order(nc, nats_url):
    subject = f"order.{uuid.uuid4().hex}"
    receiver = await connection.connect(nats_url)
    try:
        sub = await receiver.subscribe(subject)
        await settle(receiver)
        for i in range(200):  # one loop turn: the first is written at once, the rest batched
            await nc.publish(subject, str(i).encode(), headers={"n": str(i)} if i % 7 == 0 else None)
        nc.quiet = lambda: False  # the owner says it is busy: every write is batched
        for i in range(200, 220):
            await nc.publish(subject, str(i).encode())
        await settle(nc)
        got = [(await sub.next_msg(timeout=5)).data for _ in range(220)]
        assert got == [str(i).encode() for i in range(220)]
    finally:
        await receiver.close()


@pytest.mark.parametrize(
    ("subject", "reply"),
    [
        ("t.acme.ok\r\nPUB t.globex.tool.x.call 0\r\n", ""),
        ("t.acme.ok", "_INBOX.acme.x\r\nPUB t.globex.tool.x.call 0\r\n"),
        ("t.acme.with space", ""),
        ("", ""),
    ],
)
async def test_a_direct_write_refuses_subjects_that_would_inject_protocol(nc, subject, reply):
    watcher = await nc.subscribe("t.globex.>")
    await settle(nc)
    with pytest.raises(BadSubjectError):
        await nc.publish(subject, b"x", reply=reply)
    await settle(nc)
    assert watcher.pending_msgs == 0
    assert nc.is_connected  # nothing malformed reached the server


@pytest.mark.parametrize("client_kind", ["nats-py", "corral"])
async def test_requests_get_their_own_replies_over_either_client(nats_url, client_kind):
    import nats

    server = await nats.connect(nats_url)
    client = await (connection.connect(nats_url) if client_kind == "corral" else nats.connect(nats_url))
    requester = Requester(client)
    await requester.start()
    subject = f"echo.{uuid.uuid4().hex}"
    try:

        async def echo(msg):
            await msg.respond(b"re:" + msg.data)

        await server.subscribe(subject, cb=echo)
        await settle(server)
        replies = await asyncio.gather(*(requester.request(subject, str(i).encode(), 5) for i in range(50)))
        assert [reply.data for reply in replies] == [f"re:{i}".encode() for i in range(50)]
        assert not requester._pending
    finally:
        await requester.stop()
        await server.close()
        await client.close()


async def test_the_in_flight_limit_holds_with_direct_dispatch_and_messages_start_in_arrival_order(nats_url):
    started: list[int] = []
    running = 0
    peak = 0
    release = asyncio.Event()
    gate_manifest = Manifest(
        "gate",
        "holds each call until released",
        (Consume("call", "t.*.tool.gate.call", Kind.TOOL_CALL, ToolCall, "holds each call until released"),),
        audit=False,
    )
    service = Service(gate_manifest, Settings(nats_url=nats_url, max_in_flight=2, log_level="warning"))

    @service.handler("call")
    async def gate(req: Request[ToolCall]) -> int:
        nonlocal running, peak
        n = int(str(req.payload.arguments["n"]))
        started.append(n)
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
        finally:
            running -= 1
        return n

    await service.start()
    client = await connection.connect(nats_url, inbox_prefix=subjects.inbox_prefix("acme").encode())
    requester = Requester(client)
    await requester.start()
    try:
        calls = [
            asyncio.create_task(
                requester.request(
                    subjects.tool_call("acme", "gate"),
                    new_envelope_json(
                        Kind.TOOL_CALL, "acme", ToolCall(tool="gate", arguments={"n": n}), deadline=time.time() + 60
                    ),
                    30,
                )
            )
            for n in range(6)
        ]
        await asyncio.sleep(0)  # a yield, so each call has published before the flushes below
        await settle(client, service.nc)
        assert started == [0, 1]  # all six arrived; four wait for a slot
        assert peak == 2
        release.set()
        replies = [decode_reply((await call).data) for call in calls]
        assert replies == list(range(6))
        assert started == list(range(6))
        assert peak == 2
    finally:
        await requester.stop()
        await client.close()
        await service.stop()


@shortcuts_only
async def test_a_failing_direct_callback_is_reported_and_the_connection_keeps_reading(nats_url):
    errors = []

    async def on_error(error):
        errors.append(error)

    conn = await connection.connect(nats_url, error_cb=on_error)
    try:
        subject = f"broken.{uuid.uuid4().hex}"
        seen = []

        def take(msg):
            if msg.data == b"bad":
                raise ValueError("a bug in the callback")
            seen.append(msg.data)
            return True

        sub = await conn.subscribe(subject)
        conn.dispatch_directly(sub, take)
        for data in (b"one", b"bad", b"two"):
            await conn.publish(subject, data)
        await settle(conn)
        assert seen == [b"one", b"two"]
        assert [type(error) for error in errors] == [ValueError]
        assert sub.pending_msgs == 0  # the failed message was not handed out a second time
        assert conn.is_connected
    finally:
        await conn.close()


async def test_a_failing_queued_callback_is_reported_and_the_connection_keeps_reading(nats_url):
    errors = []

    async def on_error(error):
        errors.append(error)

    conn = await connection.connect(nats_url, error_cb=on_error)
    try:
        subject = f"broken.{uuid.uuid4().hex}"
        seen = []
        last = asyncio.Event()

        async def on_message(msg):
            if msg.data == b"bad":
                raise ValueError("a bug in the handler")
            seen.append(msg.data)
            if msg.data == b"two":
                last.set()

        await conn.subscribe(subject, cb=on_message)
        for data in (b"one", b"bad", b"two"):
            await conn.publish(subject, data)
        await asyncio.wait_for(last.wait(), 5)
        assert seen == [b"one", b"two"]
        assert [type(error) for error in errors] == [ValueError]
        assert conn.stats["malformed_frames"] == 0  # a handler's bug is not a frame it could not read
        assert conn.is_connected
    finally:
        await conn.close()
