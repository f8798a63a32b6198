"""One tenant floods, another is measured: ``python scripts/noisy_neighbour.py [--flood-factor 10]``.

Starts a system on free ports (``corral up``'s processes) with two tenants: ``quiet`` and
``noisy`` (rate limit ``--rate`` requests/s). The quiet tenant sends ``--requests`` requests one
after another, first alone and then while the noisy tenant, from a process of its own, sends
``--flood-factor`` times its rate limit for as long as the quiet tenant's second round lasts.
A control round sends the same flood to a subject no service reads (the broker drops it): what
the flood costs the machine (two cores shared by every process) without Corral handling it.
Prints the quiet tenant's p50/p99 in each round, the ratios, what it lost, and what the noisy
tenant got through; ``--json`` for one object. The target: the loaded p99 within 2x the unloaded
one, and nothing lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from corral.client import CorralClient
from corral.demo import DEFINITIONS as DEMO_DEFINITIONS
from corral.nats_server import free_port
from corral.system import System
from services.auth.tokens import mint_dev_token
from services.runtime import loop as event_loop
from services.runtime.credentials import load_secrets


def tenants(rate: float) -> dict[str, Any]:
    route = {"order_status": {"pattern": "graph", "graph": "order_status"}}
    return {
        "tenants": [
            {
                "tenant": "quiet",
                "default_route": "order_status",
                "routes": route,
                "tools": ["orders_lookup"],
                "rate_limit": {"per_second": 10_000, "burst": 10_000},
            },
            {
                "tenant": "noisy",
                "default_route": "order_status",
                "routes": route,
                "tools": ["orders_lookup"],
                "rate_limit": {"per_second": rate, "burst": max(1, int(rate))},
            },
        ]
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def quiet_round(client: CorralClient, requests: int) -> tuple[list[float], int]:
    latencies, lost = [], 0
    for _ in range(requests):
        started = time.perf_counter()
        try:
            await client.request("where is my order?", watch=False, timeout=10)
        except Exception:
            lost += 1
            continue
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, lost


async def flood(url: str, token: str, rate: float, seconds: float, control: bool = False) -> dict[str, int]:
    """The noisy tenant: ``rate`` requests a second for ``seconds``, open loop, answers counted.

    ``control``: the same messages to a subject no service reads (its workflow signals, while no
    workflow service runs), so the broker drops them: what the flood costs the machine without
    Corral handling it, to tell that apart from what handling it costs the quiet tenant."""
    import nats

    from contracts import subjects
    from contracts.envelope import Kind, RouterRequest, new_envelope_json

    nc = await nats.connect(url, token=token, inbox_prefix=subjects.inbox_prefix("noisy").encode())
    counts = {"sent": 0, "answered": 0, "refused": 0}
    done_sending = False
    all_answered = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        counts["answered"] += 1
        if b'"kind":"error"' in msg.data:
            counts["refused"] += 1
        if done_sending and counts["answered"] >= counts["sent"]:
            all_answered.set()

    inbox = f"{subjects.inbox_prefix('noisy')}.flood"
    await nc.subscribe(f"{inbox}.*", cb=on_reply)
    subject = subjects.workflow_signal("noisy", "dev") if control else subjects.router_request("noisy", "dev")
    body = new_envelope_json(Kind.REQUEST, "noisy", RouterRequest(input={"text": "where is my order?"}))
    started = time.monotonic()
    tick = 0.01
    while time.monotonic() - started < seconds:
        due = int((time.monotonic() - started) * rate) - counts["sent"]
        for _ in range(due):
            await nc.publish(subject, body, reply="" if control else f"{inbox}.{counts['sent']}")
            counts["sent"] += 1
        await asyncio.sleep(tick)  # pacing an open-loop load, not synchronising
    done_sending = True
    await nc.flush()
    if not control and counts["answered"] < counts["sent"]:
        with contextlib.suppress(TimeoutError):  # what is still unanswered after 10 s is reported
            await asyncio.wait_for(all_answered.wait(), 10)
    await nc.close()
    return counts


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="corral-noisy-") as scratch:
        state = Path(scratch) / "state"
        definitions = state / "definitions"
        definitions.mkdir(parents=True)
        for file in DEMO_DEFINITIONS.glob("*.yaml"):
            shutil.copy(file, definitions / file.name)
        (definitions / "noisy.yaml").write_text(yaml.safe_dump(tenants(args.rate)))
        env = {"CORRAL_LOG_LEVEL": "warning"}
        system = await System(state, port=free_port(), log_dir=Path(scratch) / "logs", env=env).start()
        try:
            key = load_secrets(state).dev_key
            client = await CorralClient.connect(system.url, tenant="quiet", token=mint_dev_token("quiet", key=key))
            try:
                await quiet_round(client, 50)  # warm-up
                alone, lost_alone = await quiet_round(client, args.requests)
                seconds = max(2.0, statistics.fmean(alone) * args.requests / 1000 * 1.5)
                flood_rate = args.flood_rate_per_s or args.rate * args.flood_factor
                token = mint_dev_token("noisy", key=key)

                async def flooded(*control: str) -> tuple[list[float], int, dict[str, int]]:
                    noisy = await asyncio.create_subprocess_exec(
                        *(sys.executable, __file__, "--flood", system.url, token, *control),
                        *("--flood-rate", str(flood_rate), "--flood-seconds", str(seconds)),
                        stdout=asyncio.subprocess.PIPE,
                        env={**os.environ, **env},
                    )
                    latencies, lost = await quiet_round(client, args.requests)
                    out, _ = await asyncio.wait_for(noisy.communicate(), seconds + 60)
                    return latencies, lost, json.loads(out.decode().strip().splitlines()[-1])

                control, lost_control, _ = await flooded("--control")
                loaded, lost_loaded, counts = await flooded()
            finally:
                await client.close()
        finally:
            system.stop()
    report = {
        "requests": args.requests,
        "noisy_rate_limit": args.rate,
        "flood_rate": args.flood_rate_per_s or args.rate * args.flood_factor,
        "quiet_p50_ms_alone": round(percentile(alone, 0.5), 3),
        "quiet_p99_ms_alone": round(percentile(alone, 0.99), 3),
        "quiet_p50_ms_flooded": round(percentile(loaded, 0.5), 3),
        "quiet_p99_ms_flooded": round(percentile(loaded, 0.99), 3),
        "quiet_p50_ms_control": round(percentile(control, 0.5), 3),
        "quiet_p99_ms_control": round(percentile(control, 0.99), 3),
        "quiet_lost": lost_alone + lost_loaded + lost_control,
        "noisy": counts,
        "event_loop": event_loop.loop_name(),
    }
    report["p99_ratio"] = round(report["quiet_p99_ms_flooded"] / report["quiet_p99_ms_alone"], 2)
    report["p99_ratio_control"] = round(report["quiet_p99_ms_control"] / report["quiet_p99_ms_alone"], 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="quiet tenant's requests per round")
    parser.add_argument("--rate", type=float, default=100.0, help="the noisy tenant's rate limit, requests/s")
    parser.add_argument("--flood-factor", type=float, default=10.0, help="the flood, in times the rate limit")
    parser.add_argument("--flood-rate-per-s", type=float, help="the flood's rate itself (instead of a factor)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--flood", nargs=2, metavar=("URL", "TOKEN"), help=argparse.SUPPRESS)
    parser.add_argument("--flood-rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--flood-seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--control", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        counts = flood(args.flood[0], args.flood[1], args.flood_rate, args.flood_seconds, args.control)
        print(json.dumps(event_loop.run(counts)))
        return
    report = event_loop.run(run(args))
    if args.json:
        print(json.dumps(report))
        return
    print(f"quiet tenant, {args.requests} requests one after another (ms):")
    print(f"  alone:   p50 {report['quiet_p50_ms_alone']:.2f}  p99 {report['quiet_p99_ms_alone']:.2f}")
    print(
        f"  control: p50 {report['quiet_p50_ms_control']:.2f}  p99 {report['quiet_p99_ms_control']:.2f}"
        f"  (p99 x{report['p99_ratio_control']}: the same flood to a subject nobody reads)"
    )
    print(
        f"  flooded: p50 {report['quiet_p50_ms_flooded']:.2f}  p99 {report['quiet_p99_ms_flooded']:.2f}"
        f"  (p99 x{report['p99_ratio']})"
    )
    print(f"  lost: {report['quiet_lost']}")
    noisy = report["noisy"]
    print(
        f"noisy tenant at {report['flood_rate']:g}/s ({args.flood_factor:g}x its limit of {args.rate:g}/s): "
        f"sent {noisy['sent']}, answered {noisy['answered']}, refused {noisy['refused']}"
    )


if __name__ == "__main__":
    main()
