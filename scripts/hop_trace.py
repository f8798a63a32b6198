"""Where one run's time goes, hop by hop: ``python scripts/hop_trace.py [--requests N] [--target T]``.

Starts a system on free ports with every process traced (``scripts/hop_trace/``), sends requests
one at a time as the ``bench`` tenant, stops the system and prints, for each step of a run, the
median wall time and (within one process) CPU time in microseconds. Clocks are comparable across
processes: ``perf_counter`` is the system's monotonic clock. The tracing itself costs a few
microseconds per step; compare steps with each other, not with ``corral bench``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRACER = HERE / "hop_trace"
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--target", default="bench_five")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-hops-") as scratch:
        os.environ["CORRAL_HOP_TRACE"] = scratch
        sys.path.insert(0, str(TRACER))
        import hop_trace_site  # this process is traced too, from here on

        from services.runtime import loop as event_loop

        event_loop.run(_drive(Path(scratch), args.requests, args.target, hop_trace_site))
        hop_trace_site._dump()
        hop_trace_site.FOLDER = None  # written: nothing left for the exit hook (the folder goes)
        print(report(load(Path(scratch)), os.getpid()))


async def _drive(scratch: Path, requests: int, target: str, tracer: object) -> None:
    from corral.client import CorralClient
    from corral.nats_server import free_port
    from corral.system import System
    from services.auth.tokens import mint_dev_token
    from services.runtime.credentials import load_secrets

    path = os.pathsep.join(filter(None, [str(TRACER), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": path, "CORRAL_HOP_TRACE": str(scratch), "CORRAL_LOG_LEVEL": "warning"}
    system = await System(scratch / "state", port=free_port(), log_dir=scratch / "logs", env=env).start()
    try:
        token = mint_dev_token("bench", key=load_secrets(scratch / "state").dev_key, ttl_s=3600)
        client = await CorralClient.connect(system.url, tenant="bench", token=token)
        for _ in range(100):  # warm-up, not traced as runs
            await client.request("where is my order?", target=target, watch=False, timeout=10)
        for _ in range(requests):
            tracer.mark("begin", "run")  # type: ignore[attr-defined]
            await client.request("where is my order?", target=target, watch=False, timeout=10)
            tracer.mark("end", "run")  # type: ignore[attr-defined]
        await client.close()
    finally:
        system.stop()  # the services write their traces as they exit


Event = tuple[int, int, int, str, str]  # (wall ns, cpu ns, pid, event, subject)


def load(folder: Path) -> list[Event]:
    events: list[Event] = []
    for trace in folder.glob("*.trace"):
        pid = int(trace.stem)
        for line in trace.read_text().splitlines():
            wall, cpu, event, subject = line.split(" ", 3)
            events.append((int(wall), int(cpu), pid, event, subject))
    events.sort()
    return events


def _role(subject: str) -> str:
    for token, role in ((".router.", "router"), (".graph.", "graph"), (".tool.", "tools"), ("_INBOX", "reply")):
        if token in subject:
            return role
    return subject


def report(events: list[Event], client: int) -> str:
    """The median of each step over the runs that took the most common path."""
    runs: list[list[Event]] = []
    current: list[Event] | None = None
    for event in events:
        _, _, pid, name, subject = event
        if pid == client and name == "begin":
            current = [event]
        elif current is not None:
            if subject.startswith(("corral.ping", "$JS", "$SYS")) or ".audit." in subject or "_INBOX._tools" in subject:
                continue  # probes and the audit trail's appends: not part of a run
            current.append(event)
            if pid == client and name == "end":
                runs.append(current)
                current = None
    if not runs:
        return "no complete runs were traced"
    shapes: dict[tuple[tuple[int, str], ...], list[list[Event]]] = defaultdict(list)
    for run in runs:
        shapes[tuple((pid, name) for _, _, pid, name, _ in run)].append(run)
    common = max(shapes.values(), key=len)
    names = {client: "client"}
    for _, _, pid, name, subject in common[0]:
        if name in ("read", "handle") and pid not in names:
            names[pid] = {"router": "router", "graph": "graph", "tools": "tools"}.get(_role(subject), f"pid {pid}")
    lines = [f"{len(common)} of {len(runs)} runs took this path; medians in microseconds", ""]
    lines.append(f"{'from':<32} {'to':<32} {'wall':>7} {'cpu':>7}")
    for step in range(1, len(common[0])):
        before, after = common[0][step - 1], common[0][step]
        walls = [(run[step][0] - run[step - 1][0]) / 1000 for run in common]
        cpu = ""
        if before[2] == after[2]:
            cpu = f"{statistics.median((run[step][1] - run[step - 1][1]) / 1000 for run in common):7.1f}"
        lines.append(
            f"{names.get(before[2], before[2])} {before[3]} {_role(before[4])}".ljust(32)
            + f" {names.get(after[2], after[2])} {after[3]} {_role(after[4])}".ljust(33)
            + f" {statistics.median(walls):7.1f} {cpu:>7}"
        )
    total = statistics.median((run[-1][0] - run[0][0]) / 1000 for run in common)
    lines.append(f"{'whole run':<65} {total:7.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
