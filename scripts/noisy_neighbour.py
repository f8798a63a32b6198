"""One tenant floods, another is measured: ``python scripts/noisy_neighbour.py [--flood-factor 10]``.

Starts a system on free ports (``corral up``'s processes) with two tenants: ``quiet`` and
``noisy`` (rate limit ``--rate`` requests/s). The quiet tenant sends ``--requests`` requests one
after another in each of four kinds of round, repeated ``--rounds`` times in turn:

- ``alone``: nothing else runs;
- ``control``: the flood's messages, from a process of their own, go to a subject only that
  process reads (the admin user's ``bench.>``): what the flood and its answers cost the broker,
  the flooding process and the two shared cores, without Corral handling any of it;
- ``at_limit``: the noisy tenant sends exactly its rate limit (everything admitted): the load a
  neighbour may put on the system by its policy;
- ``flooded``: the noisy tenant sends ``--flood-factor`` times its rate limit.

The flooding process connects, starts sending, and the quiet tenant's round starts once the noisy
tenant's bucket is empty (its first refusal: the steady flood, not the burst its policy allows);
the flood goes on until the round ends. Prints the medians over the rounds of the quiet tenant's
p50/p99 in each kind, the ratios to ``alone``, what it lost, and what the noisy tenant got
through; ``--json`` for one object. The target: the flooded p99 within 2x the unloaded one, and
nothing lost.
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
from corral.state import ADMIN_USER
from corral.system import System
from services.auth.tokens import mint_dev_token
from services.runtime import loop as event_loop
from services.runtime.credentials import load_secrets

KINDS = ("alone", "control", "at_limit", "flooded")


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


# The flooding process's token or password (the operator's, for the control round).
CREDENTIAL_VARIABLE = "NOISY_NEIGHBOUR_CREDENTIAL"


async def flood(url: str, credential: str, rate: float, control: bool) -> dict[str, int]:
    """The noisy tenant: ``rate`` requests a second, open loop, until its standard input closes.

    Prints ``steady`` once the flood is past the burst its policy allows (its first refusal; at
    once for a control or a flood under the limit), then, at the end, what was sent and answered.
    ``control``: the same messages as the admin user to ``bench.>``, read back by this process only."""
    import nats

    from contracts import subjects
    from contracts.envelope import Kind, RouterRequest, new_envelope_json

    if control:
        nc = await nats.connect(url, user=ADMIN_USER, password=credential, inbox_prefix=b"_INBOX._admin")
    else:
        nc = await nats.connect(url, token=credential, inbox_prefix=subjects.inbox_prefix("noisy").encode())
    counts = {"sent": 0, "answered": 0, "refused": 0}
    steady = asyncio.Event()
    all_answered = asyncio.Event()
    stopping = False

    async def on_reply(msg: Any) -> None:
        counts["answered"] += 1
        if b'"kind":"error"' in msg.data:
            counts["refused"] += 1
            steady.set()
        if stopping and counts["answered"] >= counts["sent"]:
            all_answered.set()

    # Reply subjects unique to this process: the broker's response permissions lose a reply when a
    # reply subject is reused while an earlier request with it is unanswered (docs/bus.md).
    inbox = f"{subjects.inbox_prefix('noisy')}.flood{os.getpid()}"
    subject = "bench.noisy.control" if control else subjects.router_request("noisy", "dev")
    # A control reads its own flood back: the broker and this process do the same message work
    # as for a flood whose every message is answered, with no service involved.
    await nc.subscribe(subject if control else f"{inbox}.*", cb=on_reply)
    body = new_envelope_json(Kind.REQUEST, "noisy", RouterRequest(input={"text": "where is my order?"}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def until_stdin_closes() -> None:
        await reader.read()
        stop.set()

    waiter = asyncio.ensure_future(until_stdin_closes())
    started = time.monotonic()
    announced = False
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate) - counts["sent"]
        for _ in range(due):
            await nc.publish(subject, body, reply="" if control else f"{inbox}.{counts['sent']}")
            counts["sent"] += 1
        if not announced and (steady.is_set() or control or time.monotonic() - started > 1.0):
            # A flood under its limit is never refused: it is steady after its first second.
            print("steady", flush=True)
            announced = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.01)  # pacing an open-loop load, not synchronising
    waiter.cancel()
    stopping = True
    await nc.flush()
    if counts["answered"] < counts["sent"]:
        with contextlib.suppress(TimeoutError):  # what is still unanswered after 10 s is reported
            await asyncio.wait_for(all_answered.wait(), 10)
    await nc.close()
    return counts


async def flooded_round(
    system: System, client: CorralClient, requests: int, credential: str, rate: float, control: bool
) -> tuple[list[float], int, dict[str, int]]:
    """One quiet round while another process floods (see :func:`flood`)."""
    noisy = await asyncio.create_subprocess_exec(
        *(sys.executable, __file__, "--flood", system.url, "--flood-rate", str(rate)),
        *(("--control",) if control else ()),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        # In the environment, not the arguments: a password may start with "-" (and ps shows arguments).
        env={**os.environ, "CORRAL_LOG_LEVEL": "warning", CREDENTIAL_VARIABLE: credential},
    )
    assert noisy.stdin is not None and noisy.stdout is not None
    try:
        line = await asyncio.wait_for(noisy.stdout.readline(), 60)
        if line.strip() != b"steady":
            raise RuntimeError(f"the flooding process did not start: {line!r}")
        latencies, lost = await quiet_round(client, requests)
    finally:
        noisy.stdin.close()
    out = await asyncio.wait_for(noisy.stdout.read(), 60)
    await noisy.wait()
    return latencies, lost, json.loads(out.decode().strip().splitlines()[-1])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    flood_rate = args.flood_rate_per_s or args.rate * args.flood_factor
    rounds: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    lost = 0
    noisy_counts = {"sent": 0, "answered": 0, "refused": 0}
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
            secrets = load_secrets(state)
            token = mint_dev_token("noisy", key=secrets.dev_key)
            admin = secrets.passwords[ADMIN_USER]
            client = await CorralClient.connect(
                system.url, tenant="quiet", token=mint_dev_token("quiet", key=secrets.dev_key)
            )
            try:
                await quiet_round(client, 50)  # warm-up
                for _ in range(args.rounds):
                    for kind in KINDS:
                        if kind == "alone":
                            latencies, missing = await quiet_round(client, args.requests)
                        else:
                            credential, rate = {
                                "control": (admin, flood_rate),
                                "at_limit": (token, args.rate),
                                "flooded": (token, flood_rate),
                            }[kind]
                            latencies, missing, counts = await flooded_round(
                                system, client, args.requests, credential, rate, kind == "control"
                            )
                            if kind == "flooded":
                                noisy_counts = {k: noisy_counts[k] + counts[k] for k in noisy_counts}
                        lost += missing
                        rounds[kind].append((percentile(latencies, 0.5), percentile(latencies, 0.99)))
            finally:
                await client.close()
        finally:
            system.stop()
    report: dict[str, Any] = {
        "requests": args.requests,
        "rounds": args.rounds,
        "noisy_rate_limit": args.rate,
        "flood_rate": flood_rate,
    }
    for kind in KINDS:
        report[f"quiet_p50_ms_{kind}"] = round(statistics.median(p50 for p50, _ in rounds[kind]), 3)
        report[f"quiet_p99_ms_{kind}"] = round(statistics.median(p99 for _, p99 in rounds[kind]), 3)
    report["quiet_lost"] = lost
    report["noisy"] = noisy_counts
    report["event_loop"] = event_loop.loop_name()
    alone = report["quiet_p99_ms_alone"]
    # Each round's p99 over the same repetition's alone round, then the median of those.
    for kind, name in (("flooded", "p99_ratio"), ("control", "p99_ratio_control"), ("at_limit", "p99_ratio_at_limit")):
        per_round = [p99 / base for (_, p99), (_, base) in zip(rounds[kind], rounds["alone"], strict=True)]
        report[name] = round(statistics.median(per_round), 2)
        report[f"{name}_rounds"] = [round(ratio, 2) for ratio in per_round]
    report["quiet_p99_ms_alone"] = alone
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="quiet tenant's requests per round")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of the four kinds of round")
    parser.add_argument("--rate", type=float, default=100.0, help="the noisy tenant's rate limit, requests/s")
    parser.add_argument("--flood-factor", type=float, default=10.0, help="the flood, in times the rate limit")
    parser.add_argument("--flood-rate-per-s", type=float, help="the flood's rate itself (instead of a factor)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--flood", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--flood-rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--control", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        counts = flood(args.flood, os.environ[CREDENTIAL_VARIABLE], args.flood_rate, args.control)
        print(json.dumps(event_loop.run(counts)), flush=True)
        return
    report = event_loop.run(run(args))
    if args.json:
        print(json.dumps(report))
        return
    print(f"quiet tenant, {args.requests} requests one after another, median of {args.rounds} rounds (ms):")
    notes = {
        "alone": "",
        "control": "the same flood, read back by its sender, no service involved",
        "at_limit": f"the noisy tenant at its limit, {args.rate:g}/s",
        "flooded": f"the noisy tenant at {report['flood_rate']:g}/s",
    }
    ratios = {"control": "p99_ratio_control", "at_limit": "p99_ratio_at_limit", "flooded": "p99_ratio"}
    for kind in KINDS:
        ratio = f"  p99 x{report[ratios[kind]]} {report[ratios[kind] + '_rounds']}" if kind in ratios else ""
        note = f"  ({notes[kind]})" if notes[kind] else ""
        print(
            f"  {kind + ':':<9} p50 {report[f'quiet_p50_ms_{kind}']:.2f}  p99 {report[f'quiet_p99_ms_{kind}']:.2f}"
            f"{ratio}{note}"
        )
    print(f"  lost: {report['quiet_lost']}")
    noisy = report["noisy"]
    print(
        f"noisy tenant at {report['flood_rate']:g}/s ({args.flood_factor:g}x its limit of {args.rate:g}/s): "
        f"sent {noisy['sent']}, answered {noisy['answered']}, refused {noisy['refused']}"
    )


if __name__ == "__main__":
    main()
