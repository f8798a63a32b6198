"""The request multiplexer the services and the client use, against a real broker."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from services.runtime.requests import Requester


@pytest.fixture
async def connections(nats_url):
    server, client = await nats.connect(nats_url), await nats.connect(nats_url)
    requester = Requester(client)
    await requester.start()
    try:
        yield server, requester
    finally:
        await requester.stop()
        await server.close()
        await client.close()


async def echo(server, subject, delay_of=None):
    async def answer(msg):
        if delay_of is not None:
            await asyncio.sleep(delay_of(msg.data))  # replies finishing out of order, not synchronisation
        await msg.respond(b"re:" + msg.data)

    tasks = set()

    async def on_message(msg):  # each answer in its own task, so they can finish out of order
        task = asyncio.create_task(answer(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await server.subscribe(subject, cb=on_message)
    await server.flush()
    await server.flush()


async def test_each_request_gets_its_own_reply_even_when_replies_come_out_of_order(connections):
    server, requester = connections
    subject = f"echo.{uuid.uuid4().hex}"
    await echo(server, subject, delay_of=lambda data: 0.001 * (50 - int(data)))
    replies = await asyncio.gather(*(requester.request(subject, str(i).encode(), 5) for i in range(50)))
    assert [reply.data for reply in replies] == [f"re:{i}".encode() for i in range(50)]
    assert not requester._pending  # nothing is left behind


async def test_nothing_serving_the_subject_is_no_responders_at_once(connections):
    _, requester = connections
    with pytest.raises(NoRespondersError):
        await requester.request(f"nobody.{uuid.uuid4().hex}", b"x", 30)


async def test_a_reply_that_never_comes_is_a_timeout(connections):
    server, requester = connections
    subject = f"silent.{uuid.uuid4().hex}"
    await server.subscribe(subject)  # takes requests, never answers
    await server.flush()
    await server.flush()
    with pytest.raises(NatsTimeout):
        await requester.request(subject, b"x", 0.05)
    assert not requester._pending


async def test_an_empty_reply_is_a_reply(connections):
    server, requester = connections
    subject = f"empty.{uuid.uuid4().hex}"

    async def answer(msg):
        await msg.respond(b"")

    await server.subscribe(subject, cb=answer)
    await server.flush()
    await server.flush()
    assert (await requester.request(subject, b"x", 5)).data == b""
