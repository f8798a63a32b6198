"""The LangGraph side of the graph benchmark: the same five-node graph, compiled and invoked in
process (LangGraph is a benchmark-only dependency: ``pip install -e '.[bench]'``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

from corral.demo.tools import find_order


class _State(TypedDict, total=False):
    tenant: str
    text: str
    lookup: dict[str, Any]
    status: str
    item: str
    eta: str
    answer: str


def build_invoke() -> Callable[[], Any] | None:
    """A zero-argument call that runs the graph once with ``invoke``; None without LangGraph."""
    try:
        from langgraph.graph import END, START, StateGraph
    except ImportError:
        return None

    graph = StateGraph(_State)
    graph.add_node("lookup", lambda s: {"lookup": find_order(s["tenant"], s["text"])})
    graph.add_node("status", lambda s: {"status": str(s["lookup"]["order"]["status"])})
    graph.add_node("item", lambda s: {"item": str(s["lookup"]["order"]["item"])})
    graph.add_node("eta", lambda s: {"eta": str(s["lookup"]["order"]["eta"])})
    graph.add_node(
        "answer",
        lambda s: {
            "answer": f"Order {s['lookup']['order']['id']} ({s['item']}) is {s['status']}, expected {s['eta']}."
        },
    )
    graph.add_edge(START, "lookup")
    for source, target in (("lookup", "status"), ("status", "item"), ("item", "eta"), ("eta", "answer")):
        graph.add_edge(source, target)
    graph.add_edge("answer", END)
    compiled = graph.compile()
    state = {"tenant": "bench", "text": "where is my order?"}
    return lambda: compiled.invoke(state)
