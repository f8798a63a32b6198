"""Per-operation, per-tenant statistics of one service replica, read over the bus by the monitor.

An *operation* is one subscription of the service (``t.*.router.request``); the tenant is the second
token of the subject. For each operation and each tenant the replica counts the messages handled,
the errors by code, the refusals by kind (a message refused before its handler ran), the handling
time (total and a histogram) and the messages in flight. The dispatcher calls, per message::

    stats = ServiceStats("router", replica_id=replica_id)
    requests = stats.operation("request", "t.*.router.request", "router")

    record = requests.start(tenant)                  # in flight from here
    ...                                              # the handler
    requests.finish(record, elapsed_s, error=None)   # or error="tool_failed"

    requests.refuse(tenant_or_none, "forbidden")     # refused before start(): no handling time

and answers a stats request with ``stats.snapshot(**parse_stats_request(msg.data))``.

The API::

    ServiceStats(service, *, replica_id, version="0.1.0", max_tenants=10_000)
        .operation(name, subject, queue_group) -> OperationStats
        .snapshot(*, tenants=None, after=None, limit=500, detail=True, since=None) -> dict   # JSON-able
    OperationStats.start(tenant) -> TenantStats
    OperationStats.finish(record, seconds, error=None) -> None
    OperationStats.refuse(tenant, kind) -> None
    parse_stats_request(data: bytes) -> dict            # the keyword arguments of snapshot()

Cost: this runs on every message, so the hot path is a dict lookup, attribute increments and one
``bisect`` on a fixed tuple of bucket bounds; no lock (one asyncio thread), no clock, no formatting
(``scripts/stats_cost.py`` measures it). Error codes and refusal kinds are dict keys, so they must
come from a fixed vocabulary (``contracts.errors.ErrorCode``), never from message content.

Memory: each operation tracks at most ``max_tenants`` tenants; messages of further tenants are
counted under ``_other``, and those whose tenant could not be read (no valid tenant id) under
``_unknown``; no tenant id can have either name. Counters are cumulative since the replica started.

The snapshot follows the shape of nats.py ``micro``'s ``$SRV.STATS`` response (``type``, ``name``,
``id``, ``version``, ``started``, ``endpoints`` with ``num_requests``, ``num_errors``,
``last_error``, ``processing_time`` and ``average_processing_time`` in nanoseconds) and adds
``pid``, ``now``, ``num_refusals``, ``in_flight``, ``errors``, ``refusals``, ``p50_ms``/``p99_ms``
(interpolated inside a histogram bucket; null without messages), ``histogram`` (``counts[i]``
counts times in ``(bounds_s[i-1], bounds_s[i]]``, the last count those above the last bound) and
``tenants``: the same fields per tenant, with the histogram's counts only. ``num_requests`` counts
handled messages, errors included; refused messages count in ``num_refusals`` only.
``tenants_tracked`` is, at the top, the number of names a walk through the pages visits and, per
endpoint, the tenants with their own record (at most ``max_tenants``, also given at the top).

Per-tenant detail is paged to keep a reply far below NATS's 1 MB payload limit: tenant names in
sorted order (the union over the operations, so each tenant is on exactly one page), ``after`` the
last name of the previous page, ``next`` the last name of this page when more remain, else null.
A page holds at most ``limit`` names (1 to 1000) and at most ``PAGE_ENTRIES`` tenant entries over
all endpoints. ``tenants=[...]`` restricts the names to those (paged the same way); ``detail=False``
gives the totals only. Totals always cover every tenant. A tenant first seen during a walk
through the pages appears in it only if its name sorts after the walk's cursor.

*Figures*: a service may also report per-tenant figures of its own kind (model tokens, workflow
runs), each a counter or a gauge, optionally split by one label (``key``, e.g. the model)::

    tokens = stats.counter("model_tokens", "Model tokens used", key="model")
    tokens.add(tenant, 120, "gpt-mini")              # a counter: cumulative, like the others
    stats.gauge("workflow_runs_driven", "Runs driven now", read=lambda: driving)  # {tenant: n}

    ServiceStats.counter(name, description="", *, key=None) -> FigureStats
    ServiceStats.gauge(name, description="", *, read, key=None, shared=False, revision=None) -> FigureStats
    FigureStats.add(tenant, n=1, key="") -> None

A gauge is read from the service's own state each time a reply is built (``read`` returns
tenant -> value), so it is always current, costs nothing between replies, and folds exactly
(``_other`` is the sum of the folded tenants' values); there is no ``set``, which could not fold
a tenant past the cap without keeping its value. A keyed gauge's ``read`` returns tenant ->
{label value: n} (workflow runs by state).

A *shared* gauge (``shared=True``, kind ``shared_gauge``) is a figure every replica of the service
reads from the same shared state (a census of a KV bucket, ``services/runtime/census.py``), so a
reader takes it from one replica instead of summing the replicas: each entry carries
``revision`` (``revision()``: how far that replica's copy of the shared state has got, the last
stream sequence it applied), and the reader takes the values of the replica with the highest.

They are in the snapshot's ``figures``: per figure ``name``, ``kind`` (``counter``/``gauge``/
``shared_gauge``), ``key`` (the label's name, or null), ``description``, ``value`` (over every
tenant), ``by`` (per label value; only with a key), ``revision`` (shared gauges only),
``tenants_tracked`` and ``tenants``: ``{tenant: {"value": n,
"by": {...}}}`` for the names of the page (the same pages as the endpoints'; figures' tenants are
in the union). The same ``max_tenants`` bound and ``_other`` / ``_unknown`` folding apply. Label
values, like error codes, must come from a fixed vocabulary (the catalog's model names). Nothing
of this is on the per-message path: a service that declares no figure pays nothing, and one that
does pays one dict update where it calls ``add``.

*Incremental readings* (``since``, ``docs/statistics.md``): every start, finish and refusal, and
a counter's ``add``, adds the tenant's name to the set of names changed in the open generation
(O(1)). A reading with ``since`` closes that generation (its first page) and lists only the names
changed since the reader's generation (the union of the closed generations' sets, at most
``KEPT_GENERATIONS``), plus the names the gauges name now; the reply's ``generation`` is where the
next reading starts, its ``since`` null when it had to be in full (another ``started``, an unknown
or forgotten generation).

``stats_cpu_s`` (top level) is the CPU time this replica has spent answering statistics requests
(building and encoding the replies), in seconds since it started: what being monitored costs it.
"""

from __future__ import annotations

import json
import os
import re
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from contracts.errors import InvalidRequest
from contracts.tenants import is_tenant_id, validate_tenant_id

STATS_TYPE = "io.corral.stats.v1"
OTHER = "_other"  # tenants past the cap; "_" cannot start a tenant id
UNKNOWN = "_unknown"  # messages whose subject carried no valid tenant id
RESERVED = frozenset({OTHER, UNKNOWN})

DEFAULT_PAGE = 500
MAX_PAGE = 1000
# Tenant entries per reply over all endpoints: a worst-case entry (63-character name, every error
# code and refusal kind, large counts) is under 800 bytes, so a page stays under 1 MB.
PAGE_ENTRIES = 1000
MAX_REQUEST_BYTES = 128 * 1024  # a request naming 1000 tenants is about 66 KB
# Closed generations kept for incremental readings (a reader further behind reads in full): one
# per reading with ``since``, so with a monitor polling once a second, 16 s of one, 8 s of two.
KEPT_GENERATIONS = 16
# A generation in which more tenants changed than this (or than a quarter of the names) is kept
# as "every name" rather than as a set nearly as large as the names.
CHANGED_KEPT = 64
MAX_SINCE_REPLICAS = 1000  # entries of a request's ``since``


def _log_bounds(low_s: float, high_s: float, count: int) -> tuple[float, ...]:
    """``count`` log-spaced bounds from ``low_s`` to ``high_s``, rounded to 3 digits to read well."""
    ratio = (high_s / low_s) ** (1 / (count - 1))
    return tuple(float(f"{low_s * ratio**i:.3g}") for i in range(count))


# 50 µs (below any dispatch) to 60 s (above any deadline), each bucket about 1.84 times the last.
BUCKET_BOUNDS_S = _log_bounds(50e-6, 60.0, 24)
_BUCKETS = len(BUCKET_BOUNDS_S) + 1  # the last counts times above the last bound
_NO_COUNTS = (0,) * _BUCKETS


class TenantStats:
    """The counters of one tenant on one operation; an operation's totals are one too."""

    __slots__ = ("counts", "errors", "in_flight", "messages", "name", "refusals", "seconds")

    def __init__(self, name: str = "") -> None:
        self.name = name  # the tenant (or _other / _unknown), which a change marks
        self.messages = 0
        self.in_flight = 0
        self.seconds = 0.0
        # Created on first use: most tenants never see an error, and refused-only ones no histogram.
        self.counts: list[int] | None = None
        self.errors: dict[str, int] | None = None
        self.refusals: dict[str, int] | None = None

    def summary(self) -> dict[str, Any]:
        """The JSON-able fields of this record; copies, so later messages do not change them."""
        counts = self.counts or _NO_COUNTS
        errors = dict(self.errors or {})
        refusals = dict(self.refusals or {})
        total_ns = int(self.seconds * 1e9)
        return {
            "num_requests": self.messages,
            "num_errors": sum(errors.values()),
            "num_refusals": sum(refusals.values()),
            "in_flight": self.in_flight,
            "processing_time": total_ns,
            "average_processing_time": total_ns // self.messages if self.messages else 0,
            "errors": errors,
            "refusals": refusals,
            "p50_ms": quantile_ms(counts, self.messages, 0.50),
            "p99_ms": quantile_ms(counts, self.messages, 0.99),
            "histogram": {"counts": list(counts)},
        }


def quantile_ms(counts: Sequence[int], total: int, q: float) -> float | None:
    """Estimate the ``q`` quantile in milliseconds, interpolating linearly inside its bucket.

    ``None`` without messages. Past the last bound all that is known is "at least", so that bound.
    """
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for bucket, n in enumerate(counts):
        if n and seen + n >= rank:
            if bucket == len(BUCKET_BOUNDS_S):
                break
            low = BUCKET_BOUNDS_S[bucket - 1] if bucket else 0.0
            high = BUCKET_BOUNDS_S[bucket]
            return round((low + (high - low) * (rank - seen) / n) * 1000, 3)
        seen += n
    return round(BUCKET_BOUNDS_S[-1] * 1000, 3)


def _counted(counts: dict[str, int] | None, key: str) -> dict[str, int]:
    """``counts`` with ``key`` counted once more (a new dict when there was none)."""
    if counts is None:
        return {key: 1}
    counts[key] = counts.get(key, 0) + 1
    return counts


class OperationStats:
    """The statistics of one operation: a record per tenant and the totals."""

    __slots__ = (
        "_mark",
        "_max_tenants",
        "_saw_name",
        "_tenants",
        "_total",
        "_tracked",
        "last_error",
        "name",
        "queue_group",
        "subject",
    )

    def __init__(
        self,
        name: str,
        subject: str,
        queue_group: str,
        *,
        max_tenants: int,
        saw_name: Callable[[str], None],
        mark: Callable[[str], None] = lambda name: None,
    ) -> None:
        self.name = name
        self.subject = subject
        self.queue_group = queue_group
        self.last_error = ""  # the last error code, as micro's ``last_error``
        self._max_tenants = max_tenants
        self._saw_name = saw_name  # tells the service, which pages over every operation's tenants
        self._mark = mark  # a tenant's figures changed: the service's set of changed names (O(1))
        self._tenants: dict[str, TenantStats] = {}
        self._tracked = 0  # tenants with their own record (``_other`` and ``_unknown`` excluded)
        self._total = TenantStats()
        self._total.counts = [0] * _BUCKETS

    def start(self, tenant: str) -> TenantStats:
        """Count a message of ``tenant`` in flight; pass the record returned to :meth:`finish`."""
        record = self._tenants.get(tenant)
        if record is None:
            record = self._record(tenant)
        record.in_flight += 1
        self._total.in_flight += 1
        self._mark(record.name)
        return record

    def finish(self, record: TenantStats, seconds: float, error: str | None = None) -> None:
        """Count a handled message that took ``seconds``; ``error`` is its code when it failed."""
        bucket = bisect_left(BUCKET_BOUNDS_S, seconds)
        self._mark(record.name)
        record.in_flight -= 1
        record.messages += 1
        record.seconds += seconds
        counts = record.counts
        if counts is None:
            counts = record.counts = [0] * _BUCKETS
        counts[bucket] += 1
        total = self._total
        total.in_flight -= 1
        total.messages += 1
        total.seconds += seconds
        total.counts[bucket] += 1  # type: ignore[index]  # created in __init__
        if error is not None:
            self.last_error = error
            record.errors = _counted(record.errors, error)
            total.errors = _counted(total.errors, error)

    def refuse(self, tenant: str | None, kind: str) -> None:
        """Count a message refused before its handler ran; ``None`` when no tenant could be read."""
        if tenant is None:
            record = self._reserved(UNKNOWN)
        else:
            found = self._tenants.get(tenant)
            record = found if found is not None else self._record(tenant)
        self._mark(record.name)
        record.refusals = _counted(record.refusals, kind)
        self._total.refusals = _counted(self._total.refusals, kind)

    @property
    def tenants_tracked(self) -> int:
        """Tenants with their own record, at most ``max_tenants``."""
        return self._tracked

    def _record(self, tenant: str) -> TenantStats:
        """The record of a tenant not seen before: a new one, or ``_unknown`` / ``_other``."""
        if not is_tenant_id(tenant):
            return self._reserved(UNKNOWN)
        if self._tracked >= self._max_tenants:
            return self._reserved(OTHER)
        self._tracked += 1
        record = self._tenants[tenant] = TenantStats(tenant)
        self._saw_name(tenant)
        return record

    def _reserved(self, name: str) -> TenantStats:
        record = self._tenants.get(name)
        if record is None:
            record = self._tenants[name] = TenantStats(name)
            self._saw_name(name)
        return record

    def totals(self) -> dict[str, Any]:
        """Every tenant's figures together (``num_requests``, ``num_errors``, ...), as copies."""
        return self._total.summary()

    def _endpoint(self, page: Sequence[str] | None) -> dict[str, Any]:
        """This operation's part of a snapshot; per-tenant detail for the names in ``page``."""
        endpoint: dict[str, Any] = {"name": self.name, "subject": self.subject, "queue_group": self.queue_group}
        endpoint.update(self.totals())
        endpoint["last_error"] = self.last_error
        endpoint["histogram"] = {"bounds_s": list(BUCKET_BOUNDS_S), **endpoint["histogram"]}
        endpoint["tenants_tracked"] = self._tracked
        if page is not None:
            tenants = self._tenants
            endpoint["tenants"] = {name: tenants[name].summary() for name in page if name in tenants}
        return endpoint


FIGURE_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")  # also a Prometheus metric name's part


class FigureStats:
    """A per-tenant figure of a service's own kind: a counter (``add``) or a gauge (``read`` when
    the reply is built), each tenant's values per label value (``""`` without a key)."""

    __slots__ = (
        "_last_read",
        "_mark",
        "_max_tenants",
        "_read",
        "_revision",
        "_saw_name",
        "_tenants",
        "_total",
        "_tracked",
        "description",
        "key",
        "kind",
        "name",
    )

    def __init__(
        self,
        name: str,
        kind: str,
        *,
        description: str,
        key: str | None,
        read: Callable[[], Mapping[str, Any]] | None,
        max_tenants: int,
        saw_name: Callable[[str], None],
        revision: Callable[[], int | None] | None = None,
        mark: Callable[[str], None] = lambda name: None,
    ) -> None:
        if not FIGURE_NAME.fullmatch(name) or (key is not None and not FIGURE_NAME.fullmatch(key)):
            raise ValueError(f"figure name and key must match {FIGURE_NAME.pattern}: {name!r}, {key!r}")
        self.name, self.kind, self.description, self.key = name, kind, description, key
        self._read = read
        self._revision = revision
        self._last_read: set[str] = set()
        self._mark = mark
        self._max_tenants = max_tenants
        self._saw_name = saw_name
        self._tenants: dict[str, dict[str, int]] = {}
        self._tracked = 0
        self._total: dict[str, int] = {}

    def add(self, tenant: str, n: int = 1, key: str = "") -> None:
        """Count ``n`` more for ``tenant`` (a counter); ``key`` is the label's value (the model)."""
        values = self._tenants.get(tenant)
        if values is None:
            values = self._values(tenant)
            if tenant not in self._tenants:  # folded into _other / _unknown: that name changed
                tenant = OTHER if is_tenant_id(tenant) else UNKNOWN
        self._mark(tenant)
        values[key] = values.get(key, 0) + n
        self._total[key] = self._total.get(key, 0) + n

    def refresh(self) -> None:
        """A gauge's values now, from its ``read``: the tenants it names (folded past the cap into
        ``_other``, summed), those it named before at 0. A keyed gauge's values are
        ``{label value: n}`` per tenant."""
        if self._read is None:
            return
        now = self._read()
        for tenant in self._last_read:
            found = self._tenants.get(tenant)
            if found:
                found.clear()
        seen: set[str] = set()
        total: dict[str, int] = {}
        for tenant, value in now.items():
            values = self._tenants.get(tenant)
            if values is None:
                values = self._values(tenant)
            for label, n in value.items() if isinstance(value, Mapping) else (("", value),):
                values[label] = values.get(label, 0) + int(n)
                total[label] = total.get(label, 0) + int(n)
            seen.add(tenant if tenant in self._tenants else (OTHER if is_tenant_id(tenant) else UNKNOWN))
        self._total = total if self.key is not None else {"": total.get("", 0)}
        self._last_read = seen

    def _values(self, tenant: str) -> dict[str, int]:
        """The values of a tenant not seen before: its own, or those of ``_unknown`` / ``_other``."""
        name = tenant
        if not is_tenant_id(tenant):
            name = UNKNOWN
        elif self._tracked >= self._max_tenants:
            name = OTHER
        values = self._tenants.get(name)
        if values is None:
            values = self._tenants[name] = {}
            if name == tenant:
                self._tracked += 1
            self._saw_name(name)
        return values

    def _entry(self, page: Sequence[str] | None) -> dict[str, Any]:
        """This figure's part of a snapshot; per-tenant values for the names in ``page``."""
        keyed = self.key is not None
        entry: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "key": self.key,
            "description": self.description,
            "value": sum(self._total.values()),
        }
        if keyed:
            entry["by"] = {k: v for k, v in self._total.items() if v}
        if self._revision is not None:
            entry["revision"] = self._revision()
        entry["tenants_tracked"] = self._tracked
        if page is not None:
            tenants = self._tenants
            shown: dict[str, Any] = {}
            for name in page:
                values = tenants.get(name)
                if values is not None:
                    shown[name] = {"value": sum(values.values())}
                    if keyed:
                        shown[name]["by"] = {k: v for k, v in values.items() if v}
            entry["tenants"] = shown
        return entry


class ServiceStats:
    """The statistics of one service replica: its operations and the snapshot the monitor reads."""

    def __init__(self, service: str, *, replica_id: str, version: str = "0.1.0", max_tenants: int = 10_000) -> None:
        if max_tenants < 1:
            raise ValueError(f"max_tenants must be at least 1, not {max_tenants}")
        self.service = service
        self.replica_id = replica_id
        self.version = version
        self.max_tenants = max_tenants
        self.started = time.time()
        self._started_text = _rfc3339(self.started)
        self._operations: dict[str, OperationStats] = {}
        self._figures: dict[str, FigureStats] = {}
        self.stats_cpu_s = 0.0  # CPU spent answering statistics requests (the service adds it)
        # Every tenant name of every operation, sorted, so that a page is a bisect and a slice.
        self._names: list[str] = []
        # Incremental readings: the names whose figures changed in the open generation (marked on
        # the hot path, a set add), the closed generations' sets (None: every name), and the
        # sorted union of a (since, until) reading, kept while its pages are read.
        self._changed: set[str] = set()
        self._generation = 0
        self._closed: deque[tuple[int, frozenset[str] | None]] = deque(maxlen=KEPT_GENERATIONS)
        self._readings: dict[tuple[int, int], list[str] | None] = {}

    def operation(self, name: str, subject: str, queue_group: str) -> OperationStats:
        """Register an operation (one subscription) and return its statistics."""
        if name in self._operations:
            raise ValueError(f"operation {name!r} is already registered")
        stats = OperationStats(
            name,
            subject,
            queue_group,
            max_tenants=self.max_tenants,
            saw_name=self._saw_name,
            mark=self._changed.add,
        )
        self._operations[name] = stats
        return stats

    @property
    def operations(self) -> tuple[OperationStats, ...]:
        return tuple(self._operations.values())

    def counter(self, name: str, description: str = "", *, key: str | None = None) -> FigureStats:
        """Register a per-tenant counter of this service's own (``add`` counts into it)."""
        return self._figure(name, "counter", description, key, None)

    def gauge(
        self,
        name: str,
        description: str = "",
        *,
        read: Callable[[], Mapping[str, Any]],
        key: str | None = None,
        shared: bool = False,
        revision: Callable[[], int | None] | None = None,
    ) -> FigureStats:
        """Register a per-tenant gauge: ``read`` (tenant -> value, or tenant -> {label value: n}
        with a ``key``) is called each time a stats reply is built (nothing to do between replies).
        ``shared``: every replica reads the same shared state, so a reader takes one replica's
        values (the one with the highest ``revision()``) instead of summing them."""
        if shared and revision is None:
            raise ValueError(f"shared gauge {name!r} needs a revision (how far the replica's copy has got)")
        return self._figure(name, "shared_gauge" if shared else "gauge", description, key, read, revision)

    def _figure(
        self,
        name: str,
        kind: str,
        description: str,
        key: str | None,
        read: Callable[[], Mapping[str, Any]] | None,
        revision: Callable[[], int | None] | None = None,
    ) -> FigureStats:
        if name in self._figures:
            raise ValueError(f"figure {name!r} is already registered")
        figure = FigureStats(
            name,
            kind,
            description=description,
            key=key,
            read=read,
            max_tenants=self.max_tenants,
            saw_name=self._saw_name,
            revision=revision,
            mark=self._changed.add,
        )
        self._figures[name] = figure
        return figure

    def snapshot(
        self,
        *,
        tenants: Iterable[str] | None = None,
        after: str | None = None,
        limit: int = DEFAULT_PAGE,
        detail: bool = True,
        since: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The stats reply (see the module docstring); ``next`` is the cursor of the next page.
        ``since`` (replica id -> ``{"started", "generation", "until"}``) asks for an incremental
        reading: only the tenants changed since that generation of this replica."""
        page: list[str] | None = None
        cursor: str | None = None
        incremental = since is not None and detail and tenants is None
        reading = self._reading(since.get(self.replica_id), after) if incremental else None  # type: ignore[union-attr]
        for figure in self._figures.values():
            figure.refresh()  # before paging: a read gauge may name tenants not seen yet
        if detail:
            size = max(1, min(limit, MAX_PAGE, PAGE_ENTRIES // max(1, len(self._operations) + len(self._figures))))
            changed = self._changed_names(*reading) if reading is not None and reading[0] is not None else None
            if changed is not None:
                # Gauges are read whole at every reply, so the tenants they name now are listed too.
                named = sorted({n for f in self._figures.values() if f._read is not None for n in f._last_read})
                page, more = _merged_page((changed, named), after, size)
                cursor = page[-1] if more else None
            else:
                names = self._names if tenants is None else sorted(set(tenants))
                first = bisect_right(names, after) if after is not None else 0
                page = names[first : first + size]
                if page and first + size < len(names):
                    cursor = page[-1]
        reply = {
            "type": STATS_TYPE,
            "name": self.service,
            "id": self.replica_id,
            "version": self.version,
            "pid": os.getpid(),
            "started": self._started_text,
            "now": _rfc3339(time.time()),
            "max_tenants": self.max_tenants,
            "endpoints": [operation._endpoint(page) for operation in self._operations.values()],
            "figures": [figure._entry(page) for figure in self._figures.values()],
            "tenants_tracked": len(self._names),
            "stats_cpu_s": round(self.stats_cpu_s, 6),
            "next": cursor,
        }
        if reading is not None:
            reply["since"], reply["generation"] = reading
        return reply

    def _reading(self, asked: Any, after: str | None) -> tuple[int | None, int]:
        """(since, until) of an incremental reading: the generations it covers (since None: in
        full). A first page (no ``until``) closes the open generation; a follow-up page names the
        same ``until`` as its first page, so every page of a walk covers the same changes. A
        reading of another start of this replica (``started``), or from a generation no longer
        kept, is in full. A page of a walk this replica is not part of (``after`` but no ``until``
        of its own: the request is another replica's follow-up) closes nothing."""
        since = until = None
        if isinstance(asked, Mapping) and asked.get("started") == self._started_text:
            since, until = asked.get("generation"), asked.get("until")
        if not isinstance(until, int) or not 0 < until <= self._generation:
            if after is not None:
                return None, self._generation
            until = self._close()
        oldest = self._closed[0][0] if self._closed else self._generation
        if not isinstance(since, int) or not oldest <= since <= until:
            since = None
        return since, until

    def _close(self) -> int:
        """Close the open generation (its changed names kept); return the new open one's number."""
        changed = self._changed
        many = len(changed) > max(CHANGED_KEPT, len(self._names) // 4)
        self._closed.append((self._generation, None if many else frozenset(changed)))
        changed.clear()  # the same set: the operations hold its ``add``
        self._generation += 1
        return self._generation

    def _changed_names(self, since: int, until: int) -> list[str] | None:
        """The sorted names changed in generations ``since`` to ``until - 1``; None: too many to
        list (a generation kept as every name), so the reading walks every name."""
        key = (since, until)
        if key in self._readings:
            return self._readings[key]
        union: set[str] | None = set()
        for generation, changed in self._closed:
            if since <= generation < until and union is not None:
                union = None if changed is None else union | changed
        if len(self._readings) >= 2 * KEPT_GENERATIONS:
            del self._readings[next(iter(self._readings))]
        found = self._readings[key] = None if union is None else sorted(union)
        return found

    def _saw_name(self, name: str) -> None:
        """Add a tenant name first seen by one operation (rare: once per tenant and operation)."""
        at = bisect_left(self._names, name)
        if at == len(self._names) or self._names[at] != name:
            self._names.insert(at, name)


def _merged_page(sources: Iterable[Sequence[str]], after: str | None, size: int) -> tuple[list[str], bool]:
    """The first ``size`` names after ``after`` in the union of sorted lists, and whether more remain."""
    taken: set[str] = set()
    for names in sources:
        first = bisect_right(names, after) if after is not None else 0
        taken.update(names[first : first + size + 1])
    merged = sorted(taken)
    return merged[:size], len(merged) > size


def _rfc3339(timestamp: float) -> str:
    """RFC 3339 in UTC with milliseconds, as micro writes ``started``."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_stats_request(data: bytes) -> dict[str, Any]:
    """Read a stats request body into :meth:`ServiceStats.snapshot`'s keyword arguments.

    The body is empty (the defaults) or a JSON object with the optional keys ``tenants`` (at most
    1000 tenant ids), ``after`` (a tenant id), ``limit`` (an integer, clamped to 1..1000) and
    ``detail`` (a boolean); other keys are ignored. Anything else raises
    :class:`~contracts.errors.InvalidRequest` with a message that says what was wrong.
    """
    request: dict[str, Any] = {"tenants": None, "after": None, "limit": DEFAULT_PAGE, "detail": True}
    if len(data) > MAX_REQUEST_BYTES:
        raise InvalidRequest(f"stats request is larger than {MAX_REQUEST_BYTES} bytes")
    if not data.strip():
        return request
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, a huge number, deep nesting
        raise InvalidRequest("stats request is not valid JSON") from None
    if body is None:
        return request
    if not isinstance(body, dict):
        raise InvalidRequest(f"stats request must be a JSON object, not {type(body).__name__}")
    if (tenants := body.get("tenants")) is not None:
        if not isinstance(tenants, list):
            raise InvalidRequest("stats request: tenants must be a list of tenant ids")
        if len(tenants) > MAX_PAGE:
            raise InvalidRequest(f"stats request: at most {MAX_PAGE} tenants, not {len(tenants)}")
        request["tenants"] = [_tenant_name(tenant, f"tenants[{i}]") for i, tenant in enumerate(tenants)]
    if (after := body.get("after")) is not None:
        request["after"] = _tenant_name(after, "after")
    if (limit := body.get("limit")) is not None:
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise InvalidRequest(f"stats request: limit must be an integer, not {type(limit).__name__}")
        request["limit"] = min(max(limit, 1), MAX_PAGE)
    if (detail := body.get("detail")) is not None:
        if not isinstance(detail, bool):
            raise InvalidRequest(f"stats request: detail must be true or false, not {type(detail).__name__}")
        request["detail"] = detail
    if (since := body.get("since")) is not None:
        request["since"] = _since(since)
    return request


def _since(value: object) -> dict[str, dict[str, Any]]:
    """An incremental request's ``since``: replica id -> ``{"started": str, "generation": int or
    null, "until": int}`` (``until`` on a follow-up page only)."""
    if not isinstance(value, dict) or len(value) > MAX_SINCE_REPLICAS:
        raise InvalidRequest(f"stats request: since must be an object of at most {MAX_SINCE_REPLICAS} replicas")
    out: dict[str, dict[str, Any]] = {}
    for replica, asked in value.items():
        if not isinstance(asked, dict) or not isinstance(asked.get("started"), str):
            raise InvalidRequest("stats request: since: each replica's entry needs started (a string)")
        entry: dict[str, Any] = {"started": asked["started"]}
        for field in ("generation", "until"):
            number = asked.get(field)
            if number is not None and (not isinstance(number, int) or isinstance(number, bool) or number < 0):
                raise InvalidRequest(f"stats request: since: {field} must be a whole number")
            entry[field] = number
        out[replica] = entry
    return out


def _tenant_name(value: object, where: str) -> str:
    """A tenant id, or one of the reserved names a snapshot shows (so a monitor can ask for them)."""
    if isinstance(value, str) and value in RESERVED:
        return value
    try:
        return validate_tenant_id(value)
    except InvalidRequest as exc:
        raise InvalidRequest(f"stats request: {where}: {exc.message}") from None
