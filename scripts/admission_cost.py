"""What admitting a tenant connection costs the auth service: ``python scripts/admission_cost.py``.

Starts a broker configured as ``corral init`` configures it and ``--replicas`` auth service
processes (nothing else), then, with one development token per tenant (``--connections``
distinct tenants):

1. **first connects**, one at a time: the auth replicas' CPU (``/proc/<pid>/schedstat``, all
   their threads) per admitted connection, and the connect latency;
2. **reconnects**: every connection closed, then opened again with the same token (what a
   client's reconnect after a broker restart or a network blip costs);
3. with ``--storm N``, a storm: N more tenants connecting at the same moment, each its own
   token, with nats-py and no retry (``--retry``: through ``CorralClient.connect``, which takes
   turns at its handshakes and retries a connect the broker timed out), counting failures, the
   slowest connect, the attempts the clients needed and how the authorisations split between
   the replicas (their counts and their CPU).

``--profile FILE`` records the first replica with py-spy during the first connects (raw
collapsed stacks: ``FILE``). Compare the figures before and after a change on the same machine in
the same hour: they move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nats

from contracts import subjects
from corral.nats_server import NatsServer, free_port
from corral.state import init_state
from services.auth.tokens import mint_dev_token
from services.runtime.loop import run as run_loop


def cpu_s(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far, in seconds (nanosecond-precise schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


async def quietly(error: Exception) -> None:
    """nats-py's error callback: the failures are counted, not printed."""


async def connect(url: str, tenant: str, token: str) -> nats.NATS:
    return await nats.connect(
        url,
        error_cb=quietly,
        token=token,
        inbox_prefix=subjects.inbox_prefix(tenant).encode(),
        allow_reconnect=False,
        max_reconnect_attempts=0,
        connect_timeout=10,
        name=f"corral-client-{tenant}",
    )


async def wait_admitting(url: str, dev_key: str, timeout: float = 30.0) -> None:
    """Until the callout admits a tenant (the replicas are up and subscribed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe = await connect(url, "probe", mint_dev_token("probe", key=dev_key, ttl_s=60))
            await probe.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # polling readiness with a deadline


async def sequential(url: str, tenants: list[tuple[str, str]], pids: list[int]) -> tuple[list[nats.NATS], dict]:
    before = sum(cpu_s(pid) for pid in pids)
    latencies, opened = [], []
    for tenant, token in tenants:
        started = time.perf_counter()
        opened.append(await connect(url, tenant, token))
        latencies.append((time.perf_counter() - started) * 1000)
    spent = sum(cpu_s(pid) for pid in pids) - before
    return opened, {
        "cpu_ms_per_connect": round(spent * 1000 / len(tenants), 3),
        "connect_p50_ms": round(statistics.median(latencies), 3),
    }


async def callouts_per_replica(url: str, admin_password: str, replicas: int) -> dict[str, int]:
    """How many authorization requests each auth replica has answered so far (its statistics)."""
    admin = await nats.connect(url, user="admin", password=admin_password, inbox_prefix=b"_INBOX._admin")
    try:
        inbox = f"_INBOX._admin.{os.getpid()}.{time.monotonic_ns()}"
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        async def collect(msg: nats.aio.msg.Msg) -> None:
            answers.put_nowait(msg.data)

        await admin.subscribe(inbox, cb=collect)
        await admin.flush()
        await admin.publish(subjects.stats("auth"), json.dumps({"detail": False}).encode(), reply=inbox)
        counts: dict[str, int] = {}
        with contextlib.suppress(TimeoutError):
            while len(counts) < replicas:
                body = json.loads(await asyncio.wait_for(answers.get(), timeout=5))
                callout = next(e for e in body["endpoints"] if e["name"] == "callout")
                counts[body["id"]] = int(callout["num_requests"])
        return counts
    finally:
        await admin.close()


async def storm(url: str, tenants: list[tuple[str, str]], pids: list[int], retry: bool) -> dict:
    from corral.client import CorralClient

    before = [cpu_s(pid) for pid in pids]
    slowest = 0.0
    failures: dict[str, int] = {}
    attempts: dict[int, int] = {}  # attempts a client needed -> clients
    opened = []

    async def one(tenant: str, token: str) -> None:
        nonlocal slowest
        started = time.perf_counter()
        try:
            if retry:
                client = await CorralClient.connect(url, tenant=tenant, token=token)
                tries = getattr(client, "attempts", 0)  # 0: a client from before the retries
                attempts[tries] = attempts.get(tries, 0) + 1
                opened.append(client)
            else:
                opened.append(await connect(url, tenant, token))
        except Exception as error:
            reason = str(error)[:80] or type(error).__name__
            failures[reason] = failures.get(reason, 0) + 1
            return
        slowest = max(slowest, time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(tenant, token) for tenant, token in tenants))
    elapsed = time.perf_counter() - started
    shares = [cpu_s(pid) - was for pid, was in zip(pids, before, strict=True)]
    for connection in opened:
        with contextlib.suppress(Exception):
            await connection.close()
    return {
        "storm": len(tenants),
        "admitted": len(opened),
        "failures": failures,
        "storm_total_s": round(elapsed, 2),
        "storm_slowest_s": round(slowest, 2),
        "replica_cpu_s": [round(share, 2) for share in shares],
        "attempts": dict(sorted(attempts.items())),
    }


def start_replicas(env: dict[str, str], replicas: int) -> list[subprocess.Popen[bytes]]:
    """The auth service processes, as ``corral up --scale auth=N`` starts them."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", "services.auth"], env={**env, "CORRAL_REPLICA": str(index)}, start_new_session=True
        )
        for index in range(replicas)
    ]


def start_profiler(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy recording ``pid``'s stacks (raw, 500 a second) into ``output`` until SIGINT."""
    spy = Path(sys.executable).parent / "py-spy"
    command = [str(spy), "record", "-p", str(pid), "-f", "raw", "-r", "500", "--nonblocking", "-o", str(output)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def stop(processes: list[subprocess.Popen[bytes]], sig: int = signal.SIGTERM) -> None:
    for process in processes:
        process.send_signal(sig)
    for process in processes:
        process.wait(timeout=30)


async def main(count: int, storm_size: int, replicas: int, retry: bool, profile: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="corral-admission-") as scratch:
        state_dir = Path(scratch) / "state"
        port = free_port()
        secrets = init_state(state_dir, port=port)
        env = {
            **os.environ,
            "CORRAL_NATS_URL": f"nats://127.0.0.1:{port}",
            "CORRAL_STATE_DIR": str(state_dir),
            "CORRAL_LOG_LEVEL": "warning",
        }
        with NatsServer(config=state_dir / "nats.conf", port=port, log_file=Path(scratch) / "nats.log") as broker:
            auth = start_replicas(env, replicas)
            spy = None
            try:
                await wait_admitting(broker.url, secrets.dev_key)
                pids = [process.pid for process in auth]
                tenants = [(f"t{i:05d}", mint_dev_token(f"t{i:05d}", key=secrets.dev_key)) for i in range(count)]
                await sequential(broker.url, [("warm", mint_dev_token("warm", key=secrets.dev_key))], pids)
                if profile is not None:
                    spy = start_profiler(pids[0], profile)
                    await asyncio.sleep(1.0)  # py-spy attaches
                opened, first = await sequential(broker.url, tenants, pids)
                if spy is not None:
                    stop([spy], signal.SIGINT)  # py-spy writes its file on SIGINT
                for connection in opened:
                    await connection.close()
                again, second = await sequential(broker.url, tenants, pids)
                for connection in again:
                    await connection.close()
                print(f"first connects ({count} tenants, one at a time): {first}")
                print(f"reconnects (the same tokens again):              {second}")
                if storm_size:
                    storming = [
                        (f"s{i:05d}", mint_dev_token(f"s{i:05d}", key=secrets.dev_key)) for i in range(storm_size)
                    ]
                    before = await callouts_per_replica(broker.url, secrets.passwords["admin"], replicas)
                    figures = await storm(broker.url, storming, pids, retry)
                    after = await callouts_per_replica(broker.url, secrets.passwords["admin"], replicas)
                    figures["callouts_per_replica"] = sorted(count - before.get(r, 0) for r, count in after.items())
                    print(f"storm ({replicas} auth replica(s), {'retrying' if retry else 'no retry'}): {figures}")
            finally:
                stop(auth)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000, help="tenants connecting one at a time (1000)")
    parser.add_argument("--storm", type=int, default=0, help="tenants connecting at the same moment afterwards")
    parser.add_argument("--replicas", type=int, default=1, help="auth service replicas (1)")
    parser.add_argument("--retry", action="store_true", help="the storm's clients retry (CorralClient.connect)")
    parser.add_argument("--profile", type=Path, help="py-spy raw stacks of the first replica's first connects")
    args = parser.parse_args()
    run_loop(main(args.connections, args.storm, args.replicas, args.retry, args.profile))
