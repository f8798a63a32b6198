"""Durable operations (JetStream pull consumers declared in a manifest): each message handled and
acknowledged once; a message held by a replica killed with SIGKILL goes to another replica."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from contracts.envelope import Kind, ToolCall, new_envelope_json
from services.runtime.settings import Settings
from tests.support.durable_worker import build, work_subject

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def stream(nats_url):
    name = f"WORK{uuid.uuid4().hex[:8].upper()}"
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=name, subjects=[work_subject(name)]))
    try:
        yield name, js
    finally:
        await js.delete_stream(name)
        await nc.close()


def item(stream: str, tool: str, tenant: str = "acme") -> tuple[str, bytes]:
    subject = work_subject(stream).replace("*", tenant)
    return subject, new_envelope_json(Kind.TOOL_CALL, tenant, ToolCall(tool=tool))


async def until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)  # polling with a deadline


async def settled(js, stream: str) -> bool:
    info = await js.consumer_info(stream, "worker-item")
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_each_message_of_a_durable_operation_is_handled_and_acknowledged_once(nats_url, stream):
    name, js = stream
    handled: list[tuple[str, str]] = []

    async def on_item(req):
        handled.append((req.tenant, req.payload.tool))

    service = build(Settings(nats_url=nats_url, log_level="warning"), name, on_item)
    await service.start()
    try:
        for n in range(5):
            await js.publish(*item(name, f"job{n}", tenant="acme" if n % 2 else "globex"))
        await until(lambda: settled(js, name))
        snapshot = service.stats.snapshot()
    finally:
        await service.stop()
    assert sorted(handled) == sorted(("acme" if n % 2 else "globex", f"job{n}") for n in range(5))
    (endpoint,) = snapshot["endpoints"]
    assert endpoint["tenants"]["acme"]["num_requests"] == 2 and endpoint["tenants"]["globex"]["num_requests"] == 3


async def test_a_malformed_durable_message_is_refused_counted_and_not_redelivered(nats_url, stream):
    name, js = stream
    handled = []

    async def on_item(req):
        handled.append(req.payload.tool)

    service = build(Settings(nats_url=nats_url, log_level="warning"), name, on_item)
    await service.start()
    try:
        await js.publish(work_subject(name).replace("*", "acme"), b"not an envelope")
        await js.publish(*item(name, "after"))
        await until(lambda: settled(js, name))
        (endpoint,) = service.stats.snapshot()["endpoints"]
    finally:
        await service.stop()
    assert handled == ["after"]
    assert endpoint["tenants"]["acme"]["refusals"] == {"invalid_request": 1}


async def test_a_message_held_by_a_replica_killed_mid_work_is_handled_by_another(nats_url, stream, tmp_path):
    name, js = stream
    env = {
        **os.environ,
        "CORRAL_NATS_URL": nats_url,
        "WORKER_STREAM": name,
        "WORKER_MARKERS": str(tmp_path),
        "CORRAL_LOG_LEVEL": "warning",
    }
    worker = subprocess.Popen([sys.executable, "-m", "tests.support.durable_worker"], cwd=ROOT, env=env)
    try:
        await js.publish(*item(name, "refund"))
        marker = tmp_path / "refund.started"

        async def started() -> bool:
            assert worker.poll() is None, "the worker exited"
            return marker.exists()

        await until(started)
        worker.send_signal(signal.SIGKILL)  # mid-message: never acknowledged
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    handled = asyncio.Event()

    async def on_item(req):
        if req.payload.tool == "refund":
            handled.set()

    replica = build(Settings(nats_url=nats_url, log_level="warning"), name, on_item)
    await replica.start()
    try:
        await asyncio.wait_for(handled.wait(), 30)  # after the ack wait (1 s) runs out
        await until(lambda: settled(js, name))
    finally:
        await replica.stop()


async def test_the_permissions_derived_from_a_durable_manifest_are_enough_and_no_more(tmp_path):
    """A broker whose only service user has exactly the manifest's permissions: the durable
    consumer works through them, and the same user is refused a consumer of another name."""
    import json

    from corral.nats_server import NatsServer
    from corral.state import _permissions_block
    from tests.support.durable_worker import manifest

    name = "LEDGER"
    worker = manifest(name)
    config = {
        "jetstream": {"store_dir": str(tmp_path / "js")},
        "accounts": {
            "APP": {
                "jetstream": "enabled",
                "users": [
                    {"user": "worker", "password": "w", "permissions": _permissions_block(worker.permissions())},
                    {"user": "setup", "password": "s"},
                ],
            }
        },
    }
    (tmp_path / "nats.conf").write_text(json.dumps(config))
    errors: list[str] = []
    with NatsServer(config=tmp_path / "nats.conf") as server:
        setup = await nats.connect(server.url, user="setup", password="s")
        js = setup.jetstream()
        await js.add_stream(StreamConfig(name=name, subjects=[work_subject(name)]))
        handled = asyncio.Event()

        async def on_item(req):
            handled.set()

        service = build(Settings(nats_url=server.url, nats_user="worker", nats_password="w"), name, on_item)

        async def on_error(error: Exception) -> None:
            errors.append(str(error))

        service._on_error = on_error  # type: ignore[method-assign]
        await service.start()
        try:
            await js.publish(*item(name, "entry"))
            await asyncio.wait_for(handled.wait(), 10)
            await until(lambda: settled(js, name))
            refused: list[str] = []

            async def on_refusal(error: Exception) -> None:
                refused.append(str(error))

            intruder = await nats.connect(
                server.url, user="worker", password="w", inbox_prefix=b"_INBOX._worker", error_cb=on_refusal
            )
            try:
                with pytest.raises(nats.errors.TimeoutError):  # the API request is dropped by the broker
                    await intruder.jetstream(timeout=1).pull_subscribe(work_subject(name), durable="other", stream=name)
            finally:
                await intruder.close()
            assert any(
                "permissions violation" in e and "CONSUMER.INFO.LEDGER.other".lower() in e.lower() for e in refused
            )
        finally:
            await service.stop()
            await setup.close()
    assert errors == []


async def test_a_replica_stops_within_its_drain_timeout_and_margin_even_if_a_handler_will_not(nats_url, stream):
    """What ``corral up`` waits for before it kills: a handler that swallows its cancellation
    (the drain timeout cancels it once) holds stopping up for at most the margin's second."""
    from services.runtime.service import STOP_MARGIN_S

    name, js = stream
    started, finished = asyncio.Event(), asyncio.Event()

    async def stubborn(req):
        started.set()
        while not finished.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await finished.wait()

    drain_s = 0.2
    service = build(Settings(nats_url=nats_url, log_level="warning", drain_timeout_s=drain_s), name, stubborn)
    await service.start()
    try:
        await js.publish(*item(name, "stuck"))
        await asyncio.wait_for(started.wait(), 20)
        began = time.monotonic()
        await service.stop()
        took = time.monotonic() - began
    finally:
        finished.set()
    assert took < drain_s + STOP_MARGIN_S  # before: the abandoned handler was waited for 5 s more


async def test_a_replica_started_before_its_stream_exists_takes_its_messages_once_it_does(nats_url):
    """Its durable consumer is made once JetStream can make it (the stream created after the
    replica started, as on a cluster still electing leaders); before, the consumer task ended
    at its first error and the replica never took a message of that operation."""
    name = f"WORK{uuid.uuid4().hex[:8].upper()}"
    handled: list[str] = []

    async def on_item(req):
        handled.append(req.payload.tool)

    service = build(Settings(nats_url=nats_url, log_level="warning"), name, on_item)
    await service.start()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await js.add_stream(StreamConfig(name=name, subjects=[work_subject(name)]))
        await js.publish(*item(name, "late"))
        await until(lambda: settled_when_made(js, name))
    finally:
        await service.stop()
        await js.delete_stream(name)
        await nc.close()
    assert handled == ["late"]


async def settled_when_made(js, stream: str) -> bool:
    try:
        return await settled(js, stream)
    except nats.js.errors.NotFoundError:  # the consumer is not made yet
        return False
