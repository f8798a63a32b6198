"""A service's own per-tenant figures (counters and gauges) in its statistics snapshot."""

from __future__ import annotations

import pytest

from services.runtime.stats import OTHER, UNKNOWN, ServiceStats


def test_a_counter_is_reported_per_tenant_and_label_with_totals():
    stats = ServiceStats("graph", replica_id="r1")
    tokens = stats.counter("model_tokens", "Model tokens", key="model")
    tokens.add("acme", 120, "mini")
    tokens.add("acme", 30, "large")
    tokens.add("globex", 5, "mini")
    (figure,) = stats.snapshot()["figures"]
    assert figure["name"] == "model_tokens" and figure["kind"] == "counter" and figure["key"] == "model"
    assert figure["value"] == 155 and figure["by"] == {"mini": 125, "large": 30}
    assert figure["tenants"]["acme"] == {"value": 150, "by": {"mini": 120, "large": 30}}
    assert figure["tenants"]["globex"] == {"value": 5, "by": {"mini": 5}}


def test_a_gauge_is_read_when_the_reply_is_built_and_forgotten_tenants_read_zero():
    stats = ServiceStats("workflow", replica_id="r1")
    driving = {"acme": 2}
    stats.gauge("workflow_runs_driven", read=lambda: driving)
    assert stats.snapshot()["figures"][0]["tenants"] == {"acme": {"value": 2}}
    driving.clear()
    figure = stats.snapshot()["figures"][0]
    assert figure["value"] == 0 and figure["tenants"] == {"acme": {"value": 0}}


def test_figures_past_the_tenant_cap_fold_into_other_and_invalid_ids_into_unknown():
    stats = ServiceStats("swarm", replica_id="r1", max_tenants=2)
    started = stats.counter("swarm_sessions_started")
    for tenant in ("acme", "globex", "initech", "umbrella"):
        started.add(tenant)
    started.add("Not A Tenant")
    driving = {"acme": 1, "globex": 1, "initech": 3, "umbrella": 4}
    stats.gauge("runs_driven", read=lambda: driving)
    counter, gauge = stats.snapshot()["figures"]
    assert counter["tenants"] == {
        "acme": {"value": 1},
        "globex": {"value": 1},
        OTHER: {"value": 2},
        UNKNOWN: {"value": 1},
    }
    assert counter["tenants_tracked"] == 2 and counter["value"] == 5
    assert gauge["tenants"][OTHER] == {"value": 7} and gauge["value"] == 9


def test_figures_are_paged_with_the_operations_tenants():
    stats = ServiceStats("graph", replica_id="r1")
    op = stats.operation("run", "t.*.graph.run", "graph")
    op.finish(op.start("acme"), 0.001)
    tokens = stats.counter("model_tokens", key="model")
    tokens.add("zeta", 10, "mini")  # a tenant only the figure knows
    first = stats.snapshot(limit=1)
    assert first["next"] == "acme" and set(first["figures"][0]["tenants"]) == set()
    second = stats.snapshot(limit=1, after=first["next"])
    assert second["next"] is None and second["figures"][0]["tenants"] == {"zeta": {"value": 10, "by": {"mini": 10}}}
    assert stats.snapshot(detail=False)["figures"][0]["value"] == 10
    assert "tenants" not in stats.snapshot(detail=False)["figures"][0]


def test_a_service_without_figures_reports_an_empty_list():
    assert ServiceStats("router", replica_id="r1").snapshot()["figures"] == []


def test_figure_names_are_metric_safe_and_registered_once():
    stats = ServiceStats("graph", replica_id="r1")
    stats.counter("model_tokens")
    with pytest.raises(ValueError):
        stats.counter("model_tokens")
    with pytest.raises(ValueError):
        stats.counter("Model-Tokens")
