"""The raw nats-py chain the benchmark compares Corral with: three processes, no envelope, no
validation, no guard, with the same message pattern as Corral's request path. It is the floor
for the same hops.

- "router" passes each request on with the client's reply subject (as Corral's router does);
- "graph" requests the next hop and answers the client with the reply (as the executor does);
- "tools" answers.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import nats

HOPS = ("bench.router", "bench.graph", "bench.tools")
MODES = ("pass", "call", "answer")
BODY = b'{"text": "where is my order?"}' * 4


async def start_chain(url: str, password: str) -> tuple[list[Any], Callable[[], Awaitable[Any]], Any]:
    """Start one process per hop; returns (processes, a call through the chain, the connection)."""
    env = {**os.environ, "CORRAL_BENCH_URL": url, "CORRAL_BENCH_PASSWORD": password}
    processes = []
    for index, subject in enumerate(HOPS):
        forward = HOPS[index + 1] if index + 1 < len(HOPS) else ""
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "corral.bench",
                "raw-hop",
                subject,
                MODES[index],
                forward,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        )
    for process in processes:  # each prints one line once subscribed
        assert process.stdout is not None
        await asyncio.wait_for(process.stdout.readline(), timeout=30)
    nc = await nats.connect(url, user="admin", password=password, inbox_prefix=b"_INBOX._admin")

    async def call() -> Any:
        return await nc.request(HOPS[0], BODY, timeout=10)

    return processes, call, nc


async def run_hop(subject: str, mode: str, forward: str) -> None:
    """One process of the chain: pass each request on, call the next hop and answer, or answer."""
    nc = await nats.connect(
        os.environ["CORRAL_BENCH_URL"],
        user="admin",
        password=os.environ["CORRAL_BENCH_PASSWORD"],
        inbox_prefix=b"_INBOX._admin",
    )
    tasks: set[asyncio.Task[None]] = set()

    async def handle(msg: Any) -> None:
        if mode == "pass":
            await nc.publish(forward, msg.data, reply=msg.reply)
        elif mode == "call":
            await msg.respond((await nc.request(forward, msg.data, timeout=10)).data)
        else:
            await msg.respond(msg.data)

    async def on_message(msg: Any) -> None:  # a task per message, as Corral's services do
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await nc.subscribe(subject, queue="bench", cb=on_message)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent goes away
