"""The monitor ingests the services' own figures: counters as per-second increases, gauges as
their last value, summed over replicas (and services), in the API's ``patterns`` and ``/metrics``."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.monitor.metrics import registry_for
from services.monitor.view import View
from services.runtime.stats import ServiceStats


def _metrics(view: View, top_k: int = 20) -> dict:
    text = generate_latest(registry_for(view, top_k=top_k)).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_counters_become_per_second_increases_summed_over_replicas_and_services():
    view = View()
    graph = ServiceStats("graph", replica_id="g1")
    swarm = ServiceStats("swarm", replica_id="s1")
    graph_tokens = graph.counter("model_tokens", key="model")
    swarm_tokens = swarm.counter("model_tokens", key="model")
    graph_tokens.add("acme", 100, "mini")
    swarm_tokens.add("acme", 20, "large")
    view.ingest("graph", graph.snapshot())
    view.ingest("swarm", swarm.snapshot())
    view.end_tick()
    graph_tokens.add("acme", 5, "mini")
    view.ingest("graph", graph.snapshot())
    view.ingest("swarm", swarm.snapshot())
    view.end_tick()
    patterns = view.detail("acme")["patterns"]
    assert patterns["model_tokens"] == 125 and patterns["model_tokens_by_model"] == {"mini": 105, "large": 20}
    samples = {(s.labels["tenant"], s.labels["model"]): s.value for s in _metrics(view)["corral_model_tokens"].samples}
    assert samples == {("acme", "mini"): 105, ("acme", "large"): 20}


def test_a_restarted_replicas_counter_counts_from_zero_again():
    view = View()
    stats = ServiceStats("workflow", replica_id="w1")
    stats.counter("workflow_runs", key="outcome").add("acme", 3, "started")
    view.ingest("workflow", stats.snapshot())
    view.end_tick()
    restarted = ServiceStats("workflow", replica_id="w1")  # the same id, counters from zero
    restarted.counter("workflow_runs", key="outcome").add("acme", 1, "started")
    view.ingest("workflow", restarted.snapshot())
    view.end_tick()
    assert view.detail("acme")["patterns"]["workflow_runs"] == {
        "started": 4,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }


def test_gauges_are_the_last_polls_values_summed_over_replicas():
    view = View()
    one, two = ServiceStats("workflow", replica_id="w1"), ServiceStats("workflow", replica_id="w2")
    driving_one, driving_two = {"acme": 2}, {"acme": 1}
    one.gauge("workflow_runs_driven", read=lambda: driving_one)
    two.gauge("workflow_runs_driven", read=lambda: driving_two)
    for stats in (one, two):
        view.ingest("workflow", stats.snapshot())
    view.end_tick()
    assert view.detail("acme")["patterns"]["workflow_runs_driven"] == 3
    driving_one.clear()
    for stats in (one, two):
        view.ingest("workflow", stats.snapshot())
    view.end_tick()
    assert view.detail("acme")["patterns"]["workflow_runs_driven"] == 1
    (sample,) = _metrics(view)["corral_workflow_runs_driven"].samples
    assert sample.labels == {"tenant": "acme"} and sample.value == 1


def test_graph_runs_active_and_swarm_turns_come_from_the_operations():
    view = View()
    graph = ServiceStats("graph", replica_id="g1")
    run = graph.operation("run", "t.*.graph.run", "graph")
    run.start("acme")  # in flight
    swarm = ServiceStats("swarm", replica_id="s1")
    turn = swarm.operation("turn", "t.*.swarm.turn", "swarm")
    turn.finish(turn.start("acme"), 0.01)
    swarm.counter("swarm_sessions_started").add("acme")
    view.ingest("graph", graph.snapshot())
    view.ingest("swarm", swarm.snapshot())
    view.end_tick()
    patterns = view.detail("acme")["patterns"]
    assert patterns["graph_runs_active"] == 1 and patterns["swarm_turns"] == 1
    assert patterns["swarm_sessions_started"] == 1
    families = _metrics(view)
    assert [s.value for s in families["corral_graph_runs_active"].samples] == [1]
    assert [s.labels for s in families["corral_swarm_sessions_started"].samples] == [{"tenant": "acme"}]


def test_figures_past_the_top_k_are_folded_into_other():
    view = View()
    stats = ServiceStats("workflow", replica_id="w1")
    op = stats.operation("start", "t.*.workflow.start", "workflow")
    runs = stats.counter("workflow_runs", key="outcome")
    for tenant, n in (("acme", 3), ("globex", 1), ("initech", 1)):
        for _ in range(n):
            op.finish(op.start(tenant), 0.001)
        runs.add(tenant, n, "started")
    view.ingest("workflow", stats.snapshot())
    view.end_tick()
    samples = _metrics(view, top_k=1)["corral_workflow_runs"].samples
    by_tenant = {s.labels["tenant"]: s.value for s in samples if s.name.endswith("_total")}
    assert by_tenant == {"acme": 3, "_other": 2}
    assert {s.labels["outcome"] for s in samples} == {"started"}
