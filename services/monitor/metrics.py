"""The Prometheus exposition of the view (``/metrics``), with the tenant label under control.

A custom collector (no global registry: each monitor builds its own ``CollectorRegistry``) yields
the current figures on each scrape. By default only the ``top_k`` tenants by traffic over the
last minute have a ``tenant`` label of their own; every other tenant's figures are summed under
``tenant="_other"``, so a scrape has at most ``(top_k + 1) x operations`` series per metric
whatever the number of tenants. ``full_tenants=True`` labels every tenant (opt-in: with 10,000
tenants a scrape is megabytes).

Counters are since the monitor started (monotonic across service replicas' restarts), as
Prometheus expects; rates are Prometheus's job (``rate(corral_messages_total[1m])``).

The services' own figures (``figures`` of their statistics) become ``corral_<figure>_total`` (a
counter) or ``corral_<figure>`` (a gauge), labelled ``tenant`` and the figure's key (``model``,
``outcome``) when it has one: ``corral_model_tokens_total{tenant,model}``,
``corral_workflow_runs_total{tenant,outcome}``. ``corral_graph_runs_active`` is the graph ``run``
operation's in-flight figure.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from services.monitor.view import AUTH_SERVICE, View
from services.monitor.window import BUCKETS
from services.runtime.stats import BUCKET_BOUNDS_S, OTHER

_OPS = ["tenant", "service", "operation"]


class ViewCollector(Collector):
    def __init__(self, view: View, *, top_k: int = 20, full_tenants: bool = False) -> None:
        self.view = view
        self.top_k = top_k
        self.full_tenants = full_tenants

    def labels_of(self) -> dict[str, str]:
        """Each tenant's label: its own name, or ``_other`` past the top K."""
        ranking = self.view.ranking()
        if self.full_tenants:
            return {tenant: tenant for tenant in ranking}
        shown = [t for t in ranking if t != OTHER][: self.top_k]
        labels = dict.fromkeys(ranking, OTHER)
        labels.update({tenant: tenant for tenant in shown})
        return labels

    def collect(self) -> Iterator[Metric]:
        view = self.view
        labels = self.labels_of()
        messages: dict[tuple[str, str, str], int] = {}
        errors: dict[tuple[str, str, str, str], int] = {}
        refusals: dict[tuple[str, str, str, str], int] = {}
        in_flight: dict[tuple[str, str, str], int] = {}
        counts: dict[tuple[str, str, str], list[int]] = {}
        granted: dict[str, int] = {}
        denied: dict[tuple[str, str], int] = {}
        connections: dict[str, int] = {}
        subscriptions: dict[str, int] = {}
        slow: dict[str, int] = {}
        stalled: dict[str, int] = {}
        for tenant, found in view.tenants.items():
            label = labels[tenant]
            for (service, operation), series in found.ops.items():
                if service == AUTH_SERVICE:
                    ok = series.total_messages - sum(series.total_errors.values())
                    granted[label] = granted.get(label, 0) + ok
                    for code, n in series.total_errors.items():
                        denied[(label, code)] = denied.get((label, code), 0) + n
                    continue
                key = (label, service, operation)
                messages[key] = messages.get(key, 0) + series.total_messages
                for code, n in series.total_errors.items():
                    errors[(*key, code)] = errors.get((*key, code), 0) + n
                for kind, n in series.total_refusals.items():
                    refusals[(*key, kind)] = refusals.get((*key, kind), 0) + n
                if n := view.in_flight(tenant, service, operation):
                    in_flight[key] = in_flight.get(key, 0) + n
                if series.counts is not None:
                    merged = counts.setdefault(key, [0] * BUCKETS)
                    for i, n in enumerate(series.counts):
                        merged[i] += n
            if found.connections is not None:
                connections[label] = connections.get(label, 0) + found.connections
                subscriptions[label] = subscriptions.get(label, 0) + (found.subscriptions or 0)
                slow[label] = slow.get(label, 0) + (found.slow_consumers or 0)
                stalled[label] = stalled.get(label, 0) + (found.stalled or 0)

        yield _family(CounterMetricFamily, "corral_messages", "Messages handled (errors included)", _OPS, messages)
        yield _family(
            CounterMetricFamily,
            "corral_errors",
            "Messages whose handler failed, by error code",
            [*_OPS, "code"],
            errors,
        )
        yield _family(
            CounterMetricFamily,
            "corral_refusals",
            "Messages refused before their handler ran, by kind",
            [*_OPS, "kind"],
            refusals,
        )
        yield _family(GaugeMetricFamily, "corral_in_flight", "Messages being handled now", _OPS, in_flight)
        histogram = HistogramMetricFamily(
            "corral_handling_seconds", "Time to handle a message", labels=_OPS, unit="seconds"
        )
        bounds = [repr(b) for b in BUCKET_BOUNDS_S] + ["+Inf"]
        for key, merged in sorted(counts.items()):
            running = 0
            buckets = []
            for bound, n in zip(bounds, merged, strict=True):
                running += n
                buckets.append((bound, running))
            histogram.add_metric(list(key), buckets, sum_value=None)
        yield histogram
        yield _family(
            CounterMetricFamily,
            "corral_auth_connections_authorized",
            "Tenant connections the auth service authorised",
            ["tenant"],
            {(k,): v for k, v in granted.items()},
        )
        yield _family(
            CounterMetricFamily,
            "corral_auth_connections_denied",
            "Tenant connections the auth service denied (a trusted key signed the token), by code",
            ["tenant", "code"],
            denied,
        )
        yield _family(
            GaugeMetricFamily,
            "corral_broker_connections",
            "Open broker connections of the tenant's users",
            ["tenant"],
            {(k,): v for k, v in connections.items()},
        )
        yield _family(
            GaugeMetricFamily,
            "corral_broker_subscriptions",
            "Subscriptions of the tenant's connections",
            ["tenant"],
            {(k,): v for k, v in subscriptions.items()},
        )
        yield _family(
            CounterMetricFamily,
            "corral_broker_slow_consumers",
            "The tenant's connections the broker closed as slow consumers (pending bytes or write deadline)",
            ["tenant"],
            {(k,): v for k, v in slow.items()},
        )
        yield _family(
            GaugeMetricFamily,
            "corral_broker_stalled_connections",
            "The tenant's open connections the broker held publishers back for since its last reading",
            ["tenant"],
            {(k,): v for k, v in stalled.items()},
        )
        yield _family(
            GaugeMetricFamily,
            "corral_graph_runs_active",
            "Graph runs in progress (the graph service's run operation in flight)",
            ["tenant"],
            {(label,): n for (label, service, operation), n in in_flight.items() if (service, operation) == GRAPH_RUN},
        )
        yield from self._figures(labels)
        tracked = GaugeMetricFamily("corral_monitor_tenants", "Tenants the monitor has figures for")
        tracked.add_metric([], len(view.tenants))
        yield tracked
        if view.updated_at is not None:
            updated = GaugeMetricFamily(
                "corral_monitor_updated", "When the monitor last polled", unit="timestamp_seconds"
            )
            updated.add_metric([], view.updated_at)
            yield updated

    def _figures(self, labels: dict[str, str]) -> Iterator[Metric]:
        """The services' own figures, a family each (summed over services, replicas and folded tenants)."""
        view = self.view
        values: dict[str, dict[tuple[str, ...], int]] = {name: {} for name in view.figure_kinds}
        for tenant, found in view.tenants.items():
            for (name, key), n in found.figure_totals.items():
                series = values[name]
                label = (labels[tenant], key) if view.figure_kinds[name][1] else (labels[tenant],)
                series[label] = series.get(label, 0) + n
        for (tenant, name, key), n in view.gauges():
            series = values[name]
            label = (labels.get(tenant, OTHER), key) if view.figure_kinds[name][1] else (labels.get(tenant, OTHER),)
            series[label] = series.get(label, 0) + n
        for name, (kind, key, description) in sorted(view.figure_kinds.items()):
            metric = f"corral_{name}"
            if metric in BUILT_IN:  # a figure may not shadow the monitor's own metrics
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield _family(family, metric, description or name, ["tenant", key] if key else ["tenant"], values[name])


# The families above, which no service figure may take the name of.
BUILT_IN = frozenset(
    "corral_" + name
    for name in [
        "messages",
        "errors",
        "refusals",
        "in_flight",
        "handling_seconds",
        "auth_connections_authorized",
        "auth_connections_denied",
        "broker_connections",
        "broker_subscriptions",
        "broker_slow_consumers",
        "broker_stalled_connections",
        "graph_runs_active",
        "monitor_tenants",
        "monitor_updated_timestamp_seconds",
    ]
)
GRAPH_RUN = ("graph", "run")


def _family(kind: type, name: str, documentation: str, labels: list[str], values: dict) -> Metric:
    family = kind(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric([key] if isinstance(key, str) else list(key), value)
    return family


def registry_for(view: View, *, top_k: int = 20, full_tenants: bool = False) -> CollectorRegistry:
    """A registry of its own holding the view's collector (nothing global is touched)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ViewCollector(view, top_k=top_k, full_tenants=full_tenants))
    return registry
