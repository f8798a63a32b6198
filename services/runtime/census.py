"""A census of a KV bucket's live keys, per tenant and state, kept from an ordered watcher.

Some figures are not a replica's own but the state of a shared bucket: the workflow runs waiting
or sleeping right now are in the run index (KV ``WORKFLOW_RUNS``), the swarm sessions in use in
KV ``SWARM_SESSIONS``. Every replica of the service keeps the same census of such a bucket and
reports it as a *shared* gauge (``ServiceStats.gauge(..., shared=True)``), which the monitor takes
from one replica instead of summing them (services/runtime/stats.py)::

    census = Census(RUNS_BUCKET, classify=run_state)          # value -> state, or None: not counted
    service.stats.gauge("workflow_runs_open", read=census.counts, key="state",
                        shared=True, revision=lambda: census.revision)
    census.start(service.nc)   # in the background: a new or empty bucket never holds up the start
    ...
    census.stop()

Keys are ``<tenant>.<rest>``; a key whose first token is not a tenant id is ignored. Only the keys
that count are kept (``classify`` returns a state): a finished run is dropped when its line says
so, a deleted or purged key when the watcher says so, so memory is bounded by what is open.

``idle=True``: a key counts while it was written within the bucket's age limit (``max_age``, read
from the bucket), with state ``classify``'s. The broker removes an aged-out value without telling
a watcher, so each key's last write time (the message's timestamp) is kept and what is older than
the age limit is pruned when the figure is read.

The watcher is nats-py's ordered consumer (``kv.watch(">")``, last value per key, then every
update). After the connection reconnects (a broker restart loses an ephemeral consumer), or when
the watch fails, a new watcher reads the bucket again from its start into a fresh census, which
replaces the old one once it has caught up; until then the old figures are served.
``revision`` is the last stream sequence applied (0 before the first catch-up): how far this
replica's copy has got.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from nats.errors import TimeoutError as NatsTimeout

from contracts.tenants import is_tenant_id

# How often a quiet watcher checks whether its connection has reconnected meanwhile.
CHECK_S = 1.0
RETRY_FIRST_S = 0.5
RETRY_MOST_S = 5.0
# An abandoned watcher's consumer (after a reconnect) goes on the broker's side after this long.
INACTIVE_S = 30.0
DELETES = ("DEL", "PURGE")

Classify = Callable[[bytes], str | None]


def watch_api(bucket: str) -> tuple[str, ...]:
    """The JetStream API subjects a census of ``bucket`` needs beyond ``kv_api`` (an ordered
    consumer has no name, so it is created on the stream's plain create subject)."""
    return (f"$JS.API.CONSUMER.CREATE.KV_{bucket}", f"$JS.API.CONSUMER.INFO.KV_{bucket}.*")


class Tally:
    """The census itself, with no NATS: live keys and the counts per tenant and state."""

    def __init__(self, ttl_s: float | None = None) -> None:
        self.ttl_s = ttl_s
        # key -> (tenant, state, written at); in write order, which is stream order (so for
        # ``ttl_s`` also time order: the oldest first).
        self._keys: dict[str, tuple[str, str, float]] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self.revision = 0

    def __len__(self) -> int:
        return len(self._keys)

    def put(self, key: str, state: str | None, at: float, revision: int = 0) -> None:
        """The key's latest value was written at ``at`` (unix s) with ``state`` (None: it does not count)."""
        self.revision = max(self.revision, revision)
        self._drop(key)
        tenant = key.partition(".")[0]
        if state is None or not is_tenant_id(tenant):
            return
        self._keys[key] = (tenant, state, at)
        states = self._counts.setdefault(tenant, {})
        states[state] = states.get(state, 0) + 1

    def delete(self, key: str, revision: int = 0) -> None:
        self.revision = max(self.revision, revision)
        self._drop(key)

    def _drop(self, key: str) -> None:
        found = self._keys.pop(key, None)
        if found is None:
            return
        tenant, state, _ = found
        states = self._counts[tenant]
        states[state] -= 1
        if not states[state]:
            del states[state]
            if not states:
                del self._counts[tenant]

    def counts(self, now: float | None = None) -> dict[str, dict[str, int]]:
        """tenant -> state -> keys (the live dict: read it, do not keep it), after pruning what
        was written longer ago than ``ttl_s`` before ``now``."""
        if self.ttl_s is not None and self._keys:
            oldest = (time.time() if now is None else now) - self.ttl_s
            while self._keys:
                key = next(iter(self._keys))
                if self._keys[key][2] >= oldest:
                    break
                self._drop(key)
        return self._counts


class Census:
    """A :class:`Tally` of ``bucket`` kept up to date from a watcher, in a background task."""

    def __init__(
        self,
        bucket: str,
        classify: Classify,
        *,
        idle: bool = False,
        headers_only: bool = False,
        log: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bucket = bucket
        self.classify = classify
        self.idle = idle
        self.headers_only = headers_only  # values are not needed (``classify`` gets b"")
        self.log = log
        self.clock = clock
        self.tally = Tally()
        self.synced = asyncio.Event()  # set once a watcher has caught up (the figures are whole)
        self.watchers = 0  # watchers created so far (a reconnect makes another)
        self._task: asyncio.Task[None] | None = None

    @property
    def revision(self) -> int:
        return self.tally.revision

    def counts(self) -> dict[str, dict[str, int]]:
        """tenant -> state -> keys counted now (a keyed gauge's ``read``)."""
        return self.tally.counts(self.clock())

    def totals(self) -> dict[str, int]:
        """tenant -> keys counted now, whatever their state (a gauge's ``read``)."""
        return {tenant: sum(states.values()) for tenant, states in self.counts().items()}

    def start(self, nc: Any) -> None:
        """Follow the bucket on connection ``nc`` until :meth:`stop` (never raises: a bucket
        missing or unreachable is tried again, with a warning once per outage)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(nc), name=f"census-{self.bucket}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self, nc: Any) -> None:
        wait = RETRY_FIRST_S
        warned = False
        while True:
            try:
                await self._follow(nc)
                wait = RETRY_FIRST_S
            except asyncio.CancelledError:
                raise
            except Exception as error:  # no bucket yet, no JetStream yet, a reconnection
                if self.log is not None and not warned:
                    self.log.warning("census_watch_failed", bucket=self.bucket, error=str(error)[:200])
                warned = True
                await asyncio.sleep(wait)  # a back-off between attempts, not a synchronisation
                wait = min(wait * 2, RETRY_MOST_S)
                continue
            warned = False

    async def _follow(self, nc: Any) -> None:
        """Read the bucket from its start into a fresh tally, serve it once caught up, and follow
        it until the connection reconnects (then return: the caller starts again)."""
        reconnects = nc.stats["reconnects"]
        kv = await nc.jetstream().key_value(self.bucket)
        ttl_s = None
        if self.idle:
            max_age = (await kv.status()).stream_info.config.max_age
            ttl_s = float(max_age) if max_age else None
        fresh = Tally(ttl_s)
        watcher = await kv.watch(">", meta_only=self.headers_only, inactive_threshold=INACTIVE_S)
        self.watchers += 1
        try:
            while nc.stats["reconnects"] == reconnects:
                try:
                    entry = await watcher.updates(timeout=CHECK_S)
                except NatsTimeout:
                    continue
                if entry is None:  # caught up: the fresh tally is the census from now on
                    self.tally = fresh
                    self.synced.set()
                    continue
                self._apply(fresh, entry)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _apply(self, tally: Tally, entry: Any) -> None:
        revision = int(entry.revision or 0)
        if entry.operation in DELETES:
            tally.delete(entry.key, revision)
            return
        try:
            state = self.classify(entry.value or b"")
        except Exception:  # a value this census cannot read does not count (and never stops it)
            state = None
        tally.put(entry.key, state, _timestamp(entry.created, self.clock), revision)


def _timestamp(created: Any, clock: Callable[[], float]) -> float:
    """A watched message's time (the broker's, when it was written), else now."""
    if isinstance(created, datetime):
        return created.timestamp()
    return clock()
