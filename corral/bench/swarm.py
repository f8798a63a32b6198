"""``corral bench swarm``: one scripted conversation of three agents on Corral over the bus and,
in the same run, in process with the OpenAI Agents SDK and Strands Agents
(:mod:`corral.bench.swarm_others`).

Corral's side runs the demo's ``bench_swarm`` route (``bench.yaml``: agents a -> b -> c, two
handoffs, a and b each calling the trivial ``bench_step`` tool through the tools service, c
answering) on a system started here: the client's token checked by the auth callout, the route
and rate limit by the router, each tool call by the tools service under the turn's tenant, and the
session claimed in JetStream KV before the turn and written back after it (durable: a second turn
of the first conversation is checked to start with c). One conversation is one turn of a new
session; its p50 and p99 one at a time, conversations per second with ``concurrency`` in flight.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from corral.bench import TENANT, percentile
from corral.bench.swarm_others import ANSWER, DEFAULT, MESSAGE, QUICK, A, B, C, ConversationError, run_others_async
from corral.bench.workflow_others import Counts, measure_latencies, measure_throughput
from corral.nats_server import free_port
from services.runtime.credentials import load_secrets

ROUTE = "bench_swarm"


def check_turn(output: Any) -> None:
    """The turn went a -> b -> c with two tool calls and c's answer, or :class:`ConversationError`."""
    handoffs = [(hop["from"], hop["to"]) for hop in output.get("handoffs", [])] if isinstance(output, dict) else []
    if handoffs != [(A, B), (B, C)] or output.get("tool_calls") != 2 or output.get("message") != ANSWER:
        raise ConversationError(f"the conversation ended otherwise: {output!r}")


async def corral_side(counts: Counts) -> dict[str, Any]:
    from corral.client import CorralClient
    from corral.system import System
    from services.auth.tokens import mint_dev_token

    with tempfile.TemporaryDirectory(prefix="corral-bench-swarm-") as scratch:
        state_dir = Path(scratch) / "state"
        system = await System(
            state_dir, port=free_port(), log_dir=Path(scratch) / "logs", env={"CORRAL_LOG_LEVEL": "warning"}
        ).start()
        try:
            secrets = load_secrets(state_dir)
            client = await CorralClient.connect(
                system.url, tenant=TENANT, token=mint_dev_token(TENANT, key=secrets.dev_key, ttl_s=3600)
            )
            try:

                async def converse() -> Any:
                    result = await client.request(MESSAGE, target=ROUTE, watch=False, timeout=30)
                    check_turn(result.output)
                    return result

                first = await converse()
                again = await client.request("And now?", target=ROUTE, session=first.output["session"], watch=False)
                if again.output.get("agent") != C or again.output.get("handoffs"):
                    raise ConversationError(f"the session was not kept: the next turn answered {again.output!r}")
                samples = await measure_latencies(converse, counts)
                rps = await measure_throughput(converse, counts)
            finally:
                await client.close()
        finally:
            system.stop()
    return {
        "p50_ms": round(percentile(samples, 0.5), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "rps": round(rps, 1),
        "runs": counts.latency_runs,
        "throughput_runs": counts.throughput_runs,
        "concurrency": counts.concurrency,
        "notes": "client -> router -> swarm service over the bus (token, route, rate limit and tool allowlist "
        "checked); 5 scripted model calls, 2 tool calls through the tools service; a new session per "
        "conversation, claimed in JetStream KV before the turn and written back after it; no progress events "
        "(the client does not watch, as the SDKs run without streaming)",
    }


async def run_swarm_bench(
    *, quick: bool = False, sides: tuple[str, ...] = ("openai_agents", "strands"), quiet: bool = False
) -> dict[str, Any]:
    """Corral's side, then each in-process side; the report has each side's figures and the flat
    keys ``<side>_swarm_p50_ms``, ``_p99_ms`` and ``_rps``, and Corral's p50 over the SDK's."""
    counts = QUICK if quick else DEFAULT
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    say("corral: starting a system...")
    results: dict[str, Any] = {"corral": await corral_side(counts)}
    say(f"corral: p50 {results['corral']['p50_ms']:.2f} ms, {results['corral']['rps']:.0f} conversations/s")
    results.update(await run_others_async(sides=sides, counts=counts))
    report: dict[str, Any] = {"sides": results}
    for side, figures in results.items():
        if "p50_ms" in figures:
            for figure in ("p50_ms", "p99_ms", "rps"):
                report[f"{side}_swarm_{figure}"] = figures[figure]
    report.setdefault("openai_agents_swarm_p50_ms", None)
    sdk = results.get("openai_agents", {})
    if "p50_ms" in sdk:
        # Below 1: Corral's conversation over the bus is faster than the SDK's in process.
        report["corral_vs_openai_agents_p50"] = round(results["corral"]["p50_ms"] / sdk["p50_ms"], 3)
        report["corral_vs_openai_agents_rps"] = round(results["corral"]["rps"] / sdk["rps"], 3)
    strands = results.get("strands", {})
    if "p50_ms" in strands:
        report["corral_vs_strands_p50"] = round(results["corral"]["p50_ms"] / strands["p50_ms"], 3)
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"{'side':<14} {'p50 ms':>9} {'p99 ms':>9} {'conv/s':>9}"]
    for side, figures in report["sides"].items():
        if "error" in figures:
            lines.append(f"{side:<14} error: {figures['error']}")
            continue
        lines.append(f"{side:<14} {figures['p50_ms']:>9.2f} {figures['p99_ms']:>9.2f} {figures['rps']:>9.0f}")
    for key in ("corral_vs_openai_agents_p50", "corral_vs_openai_agents_rps", "corral_vs_strands_p50"):
        if key in report:
            lines.append(f"{key}: {report[key]}")
    lines += [f"  {side}: {figures['notes']}" for side, figures in report["sides"].items() if "notes" in figures]
    return "\n".join(lines)
