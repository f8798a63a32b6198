"""Following a JetStream KV bucket from a service: the last value of every key, then every update.

Used by a census of a shared bucket (``services/runtime/census.py``) and by the tenant registry
(``services/runtime/tenant_registry.py``). Each *pass* reads the bucket from its start with an
ordered watcher (nats-py's ``kv.watch(">")``): every key's last value, then ``caught_up()``,
then every update as it comes. After the connection reconnects (a broker restart loses the
ephemeral consumer) the pass ends and a new one reads the bucket again from its start, so what
changed meanwhile, deletions included, is seen; what a pass built replaces the last one's only
once it has caught up (the caller's choice, in its :class:`Pass`).

A failed pass (no bucket yet, no JetStream yet, a timeout) is tried again with a back-off; a
missing bucket, or a broker with no JetStream, is ``absent()`` first (where the caller has
something to do about it) and looked for again every second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import BucketNotFoundError, NotFoundError, ServiceUnavailableError

CHECK_S = 1.0  # how often a quiet watcher looks whether its connection reconnected meanwhile
RETRY_FIRST_S = 0.5
RETRY_MOST_S = 5.0
ABSENT_RETRY_S = 1.0  # how often a missing bucket is looked for again
INACTIVE_S = 30.0  # an abandoned watcher's consumer goes on the broker's side after this long
DELETES = ("DEL", "PURGE")  # a watched entry's operation when its key was deleted or purged
# No bucket, or no JetStream (yet) on the broker.
ABSENT = (BucketNotFoundError, NotFoundError, NoRespondersError, ServiceUnavailableError)


class Pass(Protocol):
    def entry(self, entry: Any) -> None:
        """One key's value, or its deletion (``entry.operation in DELETES``)."""

    def caught_up(self) -> None:
        """Every key of the bucket was read once (then updates follow)."""


def watch_api(bucket: str) -> tuple[str, ...]:
    """The JetStream API subjects following ``bucket`` needs beyond its stream's info (an ordered
    consumer has no name, so it is created on the stream's plain create subject)."""
    return (f"$JS.API.CONSUMER.CREATE.KV_{bucket}", f"$JS.API.CONSUMER.INFO.KV_{bucket}.*")


async def follow_bucket(
    nc: Any,
    bucket: str,
    begin: Callable[[Any], Awaitable[Pass]],
    *,
    meta_only: bool = False,
    log: Any = None,
    absent: Callable[[], None] | None = None,
) -> None:
    """Follow ``bucket`` on ``nc`` until cancelled: ``begin(kv)`` starts each pass. Never raises
    but for a cancellation; a failure is logged once per outage (``kv_watch_failed``)."""
    wait = RETRY_FIRST_S
    warned = False
    while True:
        try:
            await _one_pass(nc, bucket, begin, meta_only)
            wait, warned = RETRY_FIRST_S, False
        except asyncio.CancelledError:
            raise
        except Exception as error:  # no bucket yet, no JetStream yet, a reconnection, a timeout
            if absent is not None and isinstance(error, ABSENT):
                absent()
                await asyncio.sleep(ABSENT_RETRY_S)  # looking for the bucket again, not synchronising
                continue
            if log is not None and not warned:
                log.warning("kv_watch_failed", bucket=bucket, error=str(error)[:200])
            warned = True
            await asyncio.sleep(wait)  # a back-off between attempts, not a synchronisation
            wait = min(wait * 2, RETRY_MOST_S)


async def _one_pass(nc: Any, bucket: str, begin: Callable[[Any], Awaitable[Pass]], meta_only: bool) -> None:
    """Read the bucket from its start, then follow it until the connection reconnects."""
    reconnects = nc.stats["reconnects"]
    kv = await nc.jetstream().key_value(bucket)
    current = await begin(kv)
    watcher = await kv.watch(">", meta_only=meta_only, inactive_threshold=INACTIVE_S)
    caught = False
    try:
        while nc.stats["reconnects"] == reconnects:
            try:
                entry = await watcher.updates(timeout=CHECK_S)
            except NatsTimeout:
                continue
            if entry is None:
                if not caught:
                    caught = True
                    current.caught_up()
                continue
            current.entry(entry)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
