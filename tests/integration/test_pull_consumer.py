"""The durable pull consumer hands each message on as it arrives (services/runtime/pull.py).

nats-py's ``fetch(64)`` held the messages it had until it had 64 or its timeout passed: a
workflow wake-up waited up to 5 s. Here the pull request's expiry is a minute, so a consumer
that waited for a full batch (or for the expiry) could not pass.
"""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from corral.nats_server import NatsServer, free_port
from services.runtime.pull import PullConsumer
from services.runtime.slots import Slots

WAIT_S = 20.0  # far less than the pull's expiry (60 s), far more than any delivery takes


async def _consumer(nc, stream: str, durable: str, slots: Slots, started: asyncio.Queue, given_back: list[int]):
    def start(msg) -> None:
        started.put_nowait(msg)

    def give_back() -> None:
        given_back.append(1)
        slots.give()

    return PullConsumer(
        nc,
        stream,
        durable,
        slots=slots,
        start=start,
        give_back=give_back,
        most=64,
        log=structlog.get_logger(),
        expires_s=60.0,
    )


@pytest.fixture
async def work(nats_url):
    """A work-queue stream with a durable pull consumer ``d``: (its name, JetStream)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    name = f"PULL_{uuid.uuid4().hex[:8]}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], retention=RetentionPolicy.WORK_QUEUE))
    await js.add_consumer(name, ConsumerConfig(durable_name="d", ack_policy=AckPolicy.EXPLICIT))
    try:
        yield nc, js, name
    finally:
        await js.delete_stream(name)
        await nc.close()


async def test_each_message_is_started_as_it_arrives_not_when_a_batch_fills(work):
    nc, js, name = work
    slots = Slots(64)
    started: asyncio.Queue = asyncio.Queue()
    given_back: list[int] = []
    consumer = await _consumer(nc, name, "d", slots, started, given_back)
    task = asyncio.create_task(consumer.run())
    try:
        for n in range(3):  # one at a time: each is started before the next is sent
            await js.publish(f"{name}.work", str(n).encode())
            msg = await asyncio.wait_for(started.get(), WAIT_S)
            assert msg.data == str(n).encode()
            await msg.ack()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # The request asked for the 64 free slots; the three used stay taken (their handlers give
    # them back), the 61 others were given back when the consumer stopped.
    assert len(given_back) == 61


async def test_a_full_replica_asks_for_nothing_until_a_slot_is_free(work):
    nc, js, name = work
    slots = Slots(1)
    started: asyncio.Queue = asyncio.Queue()
    consumer = await _consumer(nc, name, "d", slots, started, [])
    task = asyncio.create_task(consumer.run())
    try:
        for n in range(2):
            await js.publish(f"{name}.work", str(n).encode())
        first = await asyncio.wait_for(started.get(), WAIT_S)
        await first.ack()
        # Its only slot is in use: the second message stays with the broker, for any replica.
        info = await js.consumer_info(name, "d")
        assert started.empty() and info.num_pending == 1
        slots.give()  # the first message's handler is done
        second = await asyncio.wait_for(started.get(), WAIT_S)
        assert {first.data, second.data} == {b"0", b"1"}
        await second.ack()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_after_a_reconnection_the_next_pull_is_asked_for_at_once(tmp_path):
    """The open pull request went with the broker that was killed; the consumer asks again as
    soon as the connection is back, not when the old request would have expired (a minute
    here). A broker that stops cleanly says so (409), one killed cannot."""
    store, port = tmp_path / "js", free_port()
    broker = NatsServer(args=["-js", "-sd", str(store)], port=port).start()
    consumer: PullConsumer | None = None
    back = asyncio.Event()

    async def reconnected() -> None:
        assert consumer is not None
        consumer.reconnected()
        back.set()

    nc = await nats.connect(broker.url, reconnected_cb=reconnected, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="W", subjects=["W.>"], retention=RetentionPolicy.WORK_QUEUE))
        await js.add_consumer("W", ConsumerConfig(durable_name="d", ack_policy=AckPolicy.EXPLICIT))
        slots, started = Slots(64), asyncio.Queue()
        consumer = await _consumer(nc, "W", "d", slots, started, [])
        task = asyncio.create_task(consumer.run())
        try:
            await js.publish("W.work", b"before")
            await (await asyncio.wait_for(started.get(), WAIT_S)).ack()
            broker.process.kill()  # SIGKILL: no word to the consumer about its open request
            broker.process.wait()
            broker.close()
            broker = NatsServer(args=["-js", "-sd", str(store)], port=port).start()
            await asyncio.wait_for(back.wait(), WAIT_S)
            await js.publish("W.work", b"after")
            msg = await asyncio.wait_for(started.get(), WAIT_S)
            if msg.data == b"before":  # its ack went with the killed broker: delivered again (at least once)
                await msg.ack()
                msg = await asyncio.wait_for(started.get(), WAIT_S)
            assert msg.data == b"after"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await nc.close()
        broker.close()
