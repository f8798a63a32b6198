"""The monitor's view: every tenant x service x operation over the last minute, from statistics.

No NATS here. The poller hands it each replica's statistics pages once a second
(:meth:`View.ingest`), then closes the second (:meth:`View.end_tick`); the HTTP API and the
Prometheus collector read it. Every replica of the monitor polls on its own, so each holds the
same view (figures may differ by the second a poll fell in).

What counts where: a tenant's ``messages``, ``errors``, ``refusals``, latencies and in-flight
figures are over every operation of every service except the auth callout, whose handled
messages are the tenant's connections authorised and whose errors are its *denials* (by code:
``unauthorized`` for a token a trusted key signed but that failed a check, ``limit_exceeded`` for
a tenant at its connection limit). One client request counts once per service it passes through.

*Figures* (``figures`` of a snapshot: model tokens, workflow runs, swarm sessions) are summed over
the replicas and over the services that report the same name (graph, workflow and swarm all
report ``model_tokens``): a counter's per-second increases in a ring per (figure, label value),
a gauge's last value (of this poll, summed over the replicas). A *shared* gauge (kind
``shared_gauge``: every replica reports the same census of a shared bucket) is not summed over
the replicas: each poll takes the values of the replica whose census has got furthest (the
highest ``revision``; on a tie, the larger total).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from services.monitor.window import (
    BUCKETS,
    RATE_S,
    SLOTS,
    CoarseHistogram,
    Ring,
    bucket_delta,
    counter_delta,
    dict_delta,
    percentiles,
)
from services.runtime.stats import OTHER

AUTH_SERVICE = "auth"
WORKFLOW_OUTCOMES = ("started", "completed", "failed", "cancelled")  # the workflow_runs figure's labels
WORKFLOW_OPEN = ("running", "waiting", "sleeping")  # the workflow_runs_open figure's labels
FIGURE_KINDS = ("counter", "gauge", "shared_gauge")
# Replicas not heard from for this many seconds are forgotten (their in-flight figures too).
REPLICA_TIMEOUT_S = 10


class OpSeries:
    """One tenant's figures on one operation of one service, summed over the replicas."""

    __slots__ = (
        "counts",
        "errors",
        "errors_by_code",
        "hist",
        "messages",
        "refusals",
        "refusals_by_kind",
        "subject",
        "total_errors",
        "total_messages",
        "total_refusals",
    )

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.messages = Ring()
        self.errors: Ring | None = None  # created on the first error (most tenants have none)
        self.refusals: Ring | None = None
        self.hist: CoarseHistogram | None = None
        self.errors_by_code: dict[str, Ring] = {}
        self.refusals_by_kind: dict[str, Ring] = {}
        # Since the monitor started, monotonic across replica restarts (Prometheus counters).
        self.total_messages = 0
        self.total_errors: dict[str, int] = {}
        self.total_refusals: dict[str, int] = {}
        self.counts: list[int] | None = None


@dataclass
class TenantSeries:
    """A tenant's per-second latency figures and its broker figures."""

    ops: dict[tuple[str, str], OpSeries] = field(default_factory=dict)
    p50: Ring = field(default_factory=lambda: Ring("f"))
    p99: Ring = field(default_factory=lambda: Ring("f"))
    connections: int | None = None
    subscriptions: int | None = None
    slow_consumers: int | None = None  # connections closed as slow consumers, since the monitor started
    stalled: int | None = None  # open connections the broker stalled publishers on since its last reading
    # (figure, label value) -> its per-second increases, and since the monitor started.
    figures: dict[tuple[str, str], Ring] = field(default_factory=dict)
    figure_totals: dict[tuple[str, str], int] = field(default_factory=dict)


class View:
    """All tenants' figures; ``max_tenants`` bounds the memory (further tenants count as ``_other``)."""

    def __init__(self, *, max_tenants: int = 20_000, clock: Any = time.time) -> None:
        self.max_tenants = max_tenants
        self.clock = clock
        self.tick = 0
        self.updated_at: float | None = None
        self.tenants: dict[str, TenantSeries] = {}
        # (replica, service, operation, tenant) -> its last (messages, errors, refusals, counts), the
        # decoded JSON objects themselves (nothing changes them, so no copies).
        self._last: dict[tuple[str, str, str, str], tuple[int, dict, dict, list | None]] = {}
        self._replica_seen: dict[str, tuple[int, str]] = {}  # replica id -> (tick last heard, service)
        # (replica, service, operation, tenant) -> in flight at its last reading, non-zero only: an
        # incremental reply leaves out a tenant that did not change, so its last reading holds.
        self._in_flight: dict[tuple[str, str, str, str], int] = {}
        self._in_flight_shown: dict[tuple[str, str, str], int] = {}
        self._tick_buckets: dict[str, list[int]] = {}
        self.broker_reachable: bool | None = None
        # Figures: name -> (kind, key label, description) as a service described it first;
        # (replica, service, name, tenant) -> its last values; gauges of this poll and the last.
        self.figure_kinds: dict[str, tuple[str, str | None, str]] = {}
        self._last_figures: dict[tuple[str, str, str, str], dict[str, int]] = {}
        self._gauges: dict[tuple[str, str, str], int] = {}
        self._gauges_shown: dict[tuple[str, str, str], int] = {}
        # Shared gauges of this poll: (service, figure) -> replica -> [revision, total, values].
        self._shared: dict[tuple[str, str], dict[str, list[Any]]] = {}
        self._rows: tuple[int, dict[str, dict[str, Any]]] | None = None  # every row, for one tick

    # ---- writing -------------------------------------------------------------------------

    def ingest(self, service: str, snapshot: dict[str, Any]) -> None:
        """One page of one replica's statistics (the ``corral.stats.<service>`` reply), in full or
        incremental: a tenant the page leaves out is unchanged (no increase, the same in flight),
        never forgotten; a replica is forgotten only when it has not answered for a while."""
        replica = str(snapshot.get("id", ""))
        self._replica_seen[replica] = (self.tick, service)
        tick = self.tick
        for endpoint in snapshot.get("endpoints", ()):
            operation = str(endpoint.get("name", ""))
            subject = str(endpoint.get("subject", ""))
            for tenant, figures in (endpoint.get("tenants") or {}).items():
                self._ingest_one(tick, replica, service, operation, subject, tenant, figures)
        for figure in snapshot.get("figures") or ():
            self._ingest_figure(tick, replica, service, figure)

    def _ingest_figure(self, tick: int, replica: str, service: str, figure: dict[str, Any]) -> None:
        name, kind, key = str(figure.get("name", "")), figure.get("kind"), figure.get("key")
        if kind not in FIGURE_KINDS or not name:
            return
        self.figure_kinds.setdefault(name, (kind, key, str(figure.get("description", ""))))
        shared = None
        if kind == "shared_gauge":
            revision = figure.get("revision")
            shared = self._shared.setdefault((service, name), {}).setdefault(replica, [0, 0, {}])
            shared[0] = revision if isinstance(revision, int) else 0
            shared[1] = int(figure.get("value", 0))
        for tenant, values in (figure.get("tenants") or {}).items():
            by = values.get("by") if key is not None else None
            current = {str(k): int(v) for k, v in by.items()} if by else {"": int(values.get("value", 0))}
            if shared is not None:
                for label, value in current.items():
                    if value:
                        skey = (self._name(tenant), label)
                        shared[2][skey] = shared[2].get(skey, 0) + value
                continue
            if kind == "gauge":
                for label, value in current.items():
                    if value:
                        gkey = (self._name(tenant), name, label)
                        self._gauges[gkey] = self._gauges.get(gkey, 0) + value
                continue
            last_key = (replica, service, name, tenant)
            last = self._last_figures.get(last_key)
            if last == current:
                continue
            self._last_figures[last_key] = current
            increases = dict_delta(last, current)
            if not increases:
                continue
            found = self._tenant(tenant)
            for label, n in increases.items():
                found.figures.setdefault((name, label), Ring()).add(tick, n)
                found.figure_totals[(name, label)] = found.figure_totals.get((name, label), 0) + n

    def _ingest_one(
        self, tick: int, replica: str, service: str, operation: str, subject: str, tenant: str, figures: dict
    ) -> None:
        key = (replica, service, operation, tenant)
        messages = int(figures.get("num_requests", 0))
        errors = figures.get("errors") or {}
        refusals = figures.get("refusals") or {}
        counts = (figures.get("histogram") or {}).get("counts")
        if in_flight := int(figures.get("in_flight", 0)):
            self._in_flight[key] = in_flight
        elif self._in_flight:
            self._in_flight.pop(key, None)
        last = self._last.get(key)
        if last is not None and last[0] == messages and last[2] == refusals:
            return  # nothing new (the common case: most tenants are idle in any one second)
        self._last[key] = (messages, errors, refusals, counts)
        if last is None:
            last_messages, last_errors, last_refusals, last_counts = None, None, None, None
        else:
            last_messages, last_errors, last_refusals, last_counts = last
        restarted = last_messages is not None and messages < last_messages
        new_messages = counter_delta(last_messages, messages)
        new_errors = dict_delta(None if restarted else last_errors, errors) if errors else {}
        new_refusals = dict_delta(None if restarted else last_refusals, refusals) if refusals else {}
        buckets = bucket_delta(last_counts, counts, restarted) if counts else []
        series = self._series(tenant, service, operation, subject)
        if new_messages:
            series.messages.add(tick, new_messages)
            series.total_messages += new_messages
        for code, n in new_errors.items():
            series.errors = series.errors or Ring()
            series.errors.add(tick, n)
            series.errors_by_code.setdefault(code, Ring()).add(tick, n)
            series.total_errors[code] = series.total_errors.get(code, 0) + n
        for kind, n in new_refusals.items():
            series.refusals = series.refusals or Ring()
            series.refusals.add(tick, n)
            series.refusals_by_kind.setdefault(kind, Ring()).add(tick, n)
            series.total_refusals[kind] = series.total_refusals.get(kind, 0) + n
        if buckets:
            series.hist = series.hist or CoarseHistogram()
            series.hist.add(tick, buckets)
            series.counts = series.counts or [0] * BUCKETS
            for bucket, n in buckets:
                series.counts[bucket] += n
            if service != AUTH_SERVICE:
                merged = self._tick_buckets.setdefault(self._name(tenant), [0] * BUCKETS)
                for bucket, n in buckets:
                    merged[bucket] += n

    def end_tick(self) -> None:
        """Close the second: per-second percentiles, in-flight figures, forgotten replicas."""
        for tenant, counts in self._tick_buckets.items():
            p50, p99 = percentiles(counts)
            found = self.tenants[tenant]
            found.p50.set(self.tick, math.nan if p50 is None else p50)
            found.p99.set(self.tick, math.nan if p99 is None else p99)
        self._tick_buckets = {}
        for (_, name), replicas in self._shared.items():  # one replica's each: the furthest
            _, _, values = max(replicas.values(), key=lambda reading: (reading[0], reading[1]))
            for (tenant, label), value in values.items():
                gkey = (tenant, name, label)
                self._gauges[gkey] = self._gauges.get(gkey, 0) + value
        self._shared = {}
        self._gauges_shown, self._gauges = self._gauges, {}
        for tenant, _, _ in self._gauges_shown:
            self._tenant(tenant)  # a tenant only a gauge names has a row too
        gone = {r for r, (seen, _) in self._replica_seen.items() if self.tick - seen > REPLICA_TIMEOUT_S}
        if gone:
            self._last = {key: last for key, last in self._last.items() if key[0] not in gone}
            self._last_figures = {key: last for key, last in self._last_figures.items() if key[0] not in gone}
            self._in_flight = {key: n for key, n in self._in_flight.items() if key[0] not in gone}
            for replica in gone:
                del self._replica_seen[replica]
        shown: dict[tuple[str, str, str], int] = {}
        for (_, service, operation, tenant), n in self._in_flight.items():
            ikey = (self._name(tenant), service, operation)
            shown[ikey] = shown.get(ikey, 0) + n
        self._in_flight_shown = shown
        self.updated_at = self.clock()
        self.tick += 1

    def remembers(self, replica: str) -> bool:
        """Whether the last readings of ``replica`` are kept (an incremental reading needs them)."""
        return replica in self._replica_seen

    def set_connections(self, per_tenant: dict[str, tuple[int, int, int, int]] | None) -> None:
        """The broker's figures per tenant: (connections, subscriptions, slow consumers, stalled
        connections), see ``broker.py``; None: unknown."""
        self.broker_reachable = per_tenant is not None
        for tenant, found in self.tenants.items():
            figures = (per_tenant or {}).get(tenant)
            if per_tenant is None:
                found.connections = found.subscriptions = found.slow_consumers = found.stalled = None
            else:
                found.connections, found.subscriptions, found.slow_consumers, found.stalled = figures or (0, 0, 0, 0)
        for tenant, figures in (per_tenant or {}).items():
            if tenant not in self.tenants and len(self.tenants) < self.max_tenants:
                connections, subscriptions, slow, stalled = figures
                self.tenants[tenant] = TenantSeries(
                    connections=connections, subscriptions=subscriptions, slow_consumers=slow, stalled=stalled
                )

    def _name(self, tenant: str) -> str:
        if tenant in self.tenants or len(self.tenants) < self.max_tenants:
            return tenant
        return OTHER

    def _tenant(self, tenant: str) -> TenantSeries:
        name = self._name(tenant)
        found = self.tenants.get(name)
        if found is None:
            found = self.tenants[name] = TenantSeries()
        return found

    def _series(self, tenant: str, service: str, operation: str, subject: str) -> OpSeries:
        found = self._tenant(tenant)
        series = found.ops.get((service, operation))
        if series is None:
            series = found.ops[(service, operation)] = OpSeries(subject)
        return series

    # ---- reading -------------------------------------------------------------------------

    @property
    def now(self) -> int:
        """The last closed second."""
        return self.tick - 1

    def row(self, tenant: str) -> dict[str, Any]:
        """A tenant's figures over the window (a row of ``/api/tenants``)."""
        found = self.tenants[tenant]
        now = self.now
        recent = messages = errors = refusals = denials = in_flight = 0
        counts = [0] * BUCKETS
        for (service, operation), series in found.ops.items():
            if service == AUTH_SERVICE:
                denials += series.errors.total(now) if series.errors else 0
                continue
            recent += series.messages.total(now, RATE_S)
            messages += series.messages.total(now)
            errors += series.errors.total(now) if series.errors else 0
            refusals += series.refusals.total(now) if series.refusals else 0
            in_flight += self._in_flight_shown.get((tenant, service, operation), 0)
            if series.hist is not None:
                series.hist.merge_into(now, counts)
        p50, p99 = percentiles(counts)
        return {
            "tenant": tenant,
            "rate": round(recent / RATE_S, 3),
            "messages": messages,
            "errors": errors,
            "refusals": refusals,
            "denials": denials,
            "p50_ms": p50,
            "p99_ms": p99,
            "in_flight": in_flight,
            "connections": found.connections,
        }

    def all_rows(self) -> dict[str, dict[str, Any]]:
        """Every tenant's row, computed once per second (scrapes and API calls in between share it)."""
        if self._rows is None or self._rows[0] != self.tick:
            self._rows = (self.tick, {tenant: self.row(tenant) for tenant in self.tenants})
        return self._rows[1]

    def rows(self, tenants: Iterable[str] | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Rows of ``tenants`` (every tenant by default), busiest first."""
        if tenants is None:
            rows = list(self.all_rows().values())
        else:
            rows = [self.row(tenant) for tenant in tenants if tenant in self.tenants]
        rows.sort(key=lambda row: (-row["rate"], -row["messages"], row["tenant"]))
        return rows if limit is None else rows[:limit]

    def detail(self, tenant: str) -> dict[str, Any]:
        """A tenant's per-second series and its breakdowns (``/api/tenants/<tenant>``)."""
        found = self.tenants[tenant]
        now = self.now
        rate = [0] * SLOTS
        errors = [0] * SLOTS
        denials = [0] * SLOTS
        errors_by_code: dict[str, int] = {}
        refusals_by_kind: dict[str, int] = {}
        denials_by_reason: dict[str, int] = {}
        for (service, _), series in found.ops.items():
            auth = service == AUTH_SERVICE
            if not auth:
                _add(rate, series.messages.series(now))
            if series.errors is not None:
                _add(denials if auth else errors, series.errors.series(now))
            for code, ring in series.errors_by_code.items():
                target = denials_by_reason if auth else errors_by_code
                if n := ring.total(now):
                    target[code] = target.get(code, 0) + n
            for kind, ring in series.refusals_by_kind.items():
                if n := ring.total(now):
                    refusals_by_kind[kind] = refusals_by_kind.get(kind, 0) + n
        return {
            "tenant": tenant,
            "window_s": SLOTS,
            "updated_at": self.updated_at,
            "series": {
                "rate": rate,
                "p50_ms": _floats(found.p50.series(now)),
                "p99_ms": _floats(found.p99.series(now)),
                "errors": errors,
                "denials": denials,
            },
            "totals": self.row(tenant),
            "errors_by_code": errors_by_code,
            "refusals_by_kind": refusals_by_kind,
            "denials_by_reason": denials_by_reason,
            "patterns": self.patterns(tenant),
            "broker": {
                "connections": found.connections,
                "subscriptions": found.subscriptions,
                "slow_consumers": found.slow_consumers,
                "stalled_connections": found.stalled,
            },
        }

    def figure_window(self, tenant: str, name: str) -> dict[str, int]:
        """A counter figure's increases over the window, per label value (``""`` without a key)."""
        found, now = self.tenants[tenant], self.now
        out = {}
        for (figure, label), ring in found.figures.items():
            if figure == name and (n := ring.total(now)):
                out[label] = out.get(label, 0) + n
        return out

    def gauges(self) -> list[tuple[tuple[str, str, str], int]]:
        """Every gauge figure's value at the last poll: ((tenant, figure, label value), value)."""
        return list(self._gauges_shown.items())

    def gauge(self, tenant: str, name: str) -> int:
        """A gauge figure's value at the last poll, summed over the replicas and label values."""
        return sum(self.gauge_by(tenant, name).values())

    def gauge_by(self, tenant: str, name: str) -> dict[str, int]:
        """A gauge figure's values at the last poll per label value (``""`` without a key)."""
        out: dict[str, int] = {}
        for (t, figure, label), v in self._gauges_shown.items():
            if t == tenant and figure == name:
                out[label] = out.get(label, 0) + v
        return out

    def patterns(self, tenant: str) -> dict[str, Any]:
        """The agent patterns' figures of a tenant: counters over the window, gauges now."""
        found, now = self.tenants[tenant], self.now
        turns = found.ops.get(("swarm", "turn"))
        runs = self.figure_window(tenant, "workflow_runs")
        tokens = self.figure_window(tenant, "model_tokens")
        open_runs = self.gauge_by(tenant, "workflow_runs_open")
        return {
            "graph_runs_active": self.in_flight(tenant, "graph", "run"),
            "workflow_runs": {outcome: runs.get(outcome, 0) for outcome in WORKFLOW_OUTCOMES},
            "workflow_runs_open": {state: open_runs.get(state, 0) for state in WORKFLOW_OPEN},
            "workflow_runs_driven": self.gauge(tenant, "workflow_runs_driven"),
            "swarm_turns": turns.messages.total(now) if turns is not None else 0,
            "swarm_sessions_started": sum(self.figure_window(tenant, "swarm_sessions_started").values()),
            "swarm_sessions_active": self.gauge(tenant, "swarm_sessions_active"),
            "model_tokens": sum(tokens.values()),
            "model_tokens_by_model": tokens,
        }

    def subjects(self, tenant: str) -> list[dict[str, Any]]:
        """A tenant's figures per operation (``/api/subjects``)."""
        found = self.tenants.get(tenant)
        if found is None:
            return []
        now = self.now
        out = []
        for (service, operation), series in sorted(found.ops.items()):
            counts = [0] * BUCKETS
            if series.hist is not None:
                series.hist.merge_into(now, counts)
            p50, p99 = percentiles(counts)
            out.append(
                {
                    "family": family(series.subject, tenant),
                    "service": service,
                    "operation": operation,
                    "rate": round(series.messages.total(now, RATE_S) / RATE_S, 3),
                    "messages": series.messages.total(now),
                    "errors": series.errors.total(now) if series.errors else 0,
                    "p50_ms": p50,
                    "p99_ms": p99,
                }
            )
        return out

    def in_flight(self, tenant: str, service: str, operation: str) -> int:
        return self._in_flight_shown.get((tenant, service, operation), 0)

    def ranking(self) -> list[str]:
        """Tenants by traffic over the window (messages, then name), busiest first."""
        rows = self.all_rows()
        return sorted(rows, key=lambda tenant: (-rows[tenant]["messages"], tenant))


def family(subject: str, tenant: str) -> str:
    """An operation's subject with the tenant in its place, trailing wildcards dropped:
    ``t.*.router.request.>`` -> ``t.acme.router.request``."""
    tokens = subject.split(".")
    if len(tokens) > 1 and tokens[0] == "t" and tokens[1] == "*":
        tokens[1] = tenant
    while len(tokens) > 2 and tokens[-1] in ("*", ">"):  # the principal and scopes: not the family
        tokens.pop()
    return ".".join(tokens)


def _add(into: list[int], values: list[float]) -> None:
    for i, value in enumerate(values):
        into[i] += int(value)


def _floats(values: list[float]) -> list[float | None]:
    return [None if math.isnan(v) else round(v, 3) for v in values]
