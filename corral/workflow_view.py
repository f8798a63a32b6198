"""``corral workflow show``: a run's history as a readable timeline."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

# How each history event reads in the timeline (anything else is shown by its type).
_PHRASES = {
    "run_started": "started",
    "step_started": "started (attempt {attempt})",
    "step_completed": "completed",
    "step_failed": "failed (attempt {attempt}): {code}: {message}",
    "branch_chosen": "took the {arm!s} branch",
    "waiting": "waiting for signal {signal!r}",
    "signal_received": "signal {signal!r} from {by}",
    "signal_buffered": "signal {signal!r} from {by} kept for a wait ahead",
    "wait_timed_out": "timed out waiting for {signal!r}",
    "sleeping": "sleeping",
    "run_failing": "run failed at {step}: {code}: {message}; compensating",
    "cancel_requested": "cancel requested by {by}",
    "compensation_started": "compensating (attempt {attempt})",
    "compensation_completed": "compensated",
    "compensation_failed": "compensation failed (attempt {attempt}): {code}: {message}",
    "run_completed": "run completed",
    "run_failed": "run failed: {code}: {message}",
    "run_cancelled": "run cancelled",
}


def timeline(shown: dict[str, Any]) -> str:
    """Lines of ``+seconds  step  what happened  (duration)`` from ``CorralClient.show``'s answer."""
    run, events = shown["run"], shown["events"]
    start = events[0]["at"] if events else run.get("started_at", 0)
    stamp = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"run {run['run_id']}  workflow {run['workflow']}  {run['status']}  started {stamp}"]
    for event in events:
        kind = event["type"]
        phrase = _PHRASES.get(kind, kind)
        try:
            what = phrase.format(**{key: event.get(key) for key in _fields(phrase)})
        except (KeyError, IndexError, ValueError):
            what = kind
        if kind == "step_failed" and event.get("retry_at"):
            what += f", retrying in {max(0.0, event['retry_at'] - event['at']):.2f} s"
        if kind == "step_completed" and "output" in event:
            what += f" -> {_short(event['output'])}"
        if kind == "run_completed":
            what += f" -> {_short(event.get('output'))}"
        took = f"  ({event['ms']:.1f} ms)" if isinstance(event.get("ms"), int | float) else ""
        step = event.get("step") or ""
        lines.append(f"  +{event['at'] - start:8.3f}s  {step:<16} {what}{took}")
    return "\n".join(lines)


def _fields(phrase: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(phrase) if name]


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."
