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
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from contracts.tenants import is_tenant_id
from services.runtime.kv_follow import DELETES, follow_bucket, watch_api
from services.runtime.tasks import keep_cancelling

__all__ = ["Census", "Tally", "watch_api"]

Classify = Callable[[bytes], str | None]


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
            keep_cancelling(self._task)  # a cancellation nats-py's wait_for swallows is sent again
            self._task = None

    async def _run(self, nc: Any) -> None:
        await follow_bucket(nc, self.bucket, self._begin, meta_only=self.headers_only, log=self.log)

    async def _begin(self, kv: Any) -> _Reading:
        """A pass reads the bucket into a fresh tally, which is the census once it has caught up."""
        ttl_s = None
        if self.idle:
            max_age = (await kv.status()).stream_info.config.max_age
            ttl_s = float(max_age) if max_age else None
        self.watchers += 1
        return _Reading(self, Tally(ttl_s))

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


class _Reading:
    """One pass over the bucket (services/runtime/kv_follow.py): into ``fresh``, served once caught up."""

    def __init__(self, census: Census, fresh: Tally) -> None:
        self.census, self.fresh = census, fresh

    def entry(self, entry: Any) -> None:
        self.census._apply(self.fresh, entry)

    def caught_up(self) -> None:
        self.census.tally = self.fresh
        self.census.synced.set()


def _timestamp(created: Any, clock: Callable[[], float]) -> float:
    """A watched message's time (the broker's, when it was written), else now."""
    if isinstance(created, datetime):
        return created.timestamp()
    return clock()
