"""The workflow engine's durable state on JetStream, every key and subject partitioned by tenant.

- ``WORKFLOW_HISTORY``: one subject per run (``t.<tenant>.workflow.history.<run_id>``); each
  message is a JSON list of the events one append records together (a step's outcome and the
  start of the next, a decision and what follows it), all or nothing. Appends carry
  ``Nats-Expected-Last-Subject-Sequence``: a writer whose view of the run is stale (a replica
  that lost its lease) cannot commit. No cap on a run's length; a snapshot every
  :data:`SNAPSHOT_EVERY` events bounds what recovery reads.
- ``WORKFLOW_TASKS``: work-queue stream of wake-ups (``t.<tenant>.workflow.task.<run_id>``) taken
  by the replicas' durable consumer, and one timer per run (``...workflow.timer.<run_id>``), a
  scheduled message (``Nats-Schedule``) that the broker turns into a wake-up when it is due:
  durable sleeps, wait timeouts, retry backoffs and the recovery of a run whose replica died,
  with no poller.
- KV ``WORKFLOW_RUNS`` (the run index for listing), ``WORKFLOW_LEASES`` (who drives a run now;
  a key not renewed for :data:`LEASE_KEY_MAX_AGE_S` goes by itself),
  ``WORKFLOW_KEYS`` (idempotency keys of starts), ``WORKFLOW_SNAPSHOTS``: keys ``<tenant>.<...>``.

No tenant can reach any of these: tenant users may publish only their requests, signals and
queries, and the workflow service reads a run only under the tenant of the subject it was asked on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import (
    APIError,
    BadRequestError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from pydantic_core import to_json

from contracts import subjects
from contracts.envelope import Kind, new_envelope_json
from contracts.errors import Unavailable
from services.runtime.requests import Requester
from services.runtime.settings import jetstream_replicas

HISTORY_STREAM = "WORKFLOW_HISTORY"
TASKS_STREAM = "WORKFLOW_TASKS"
RUNS_BUCKET = "WORKFLOW_RUNS"
LEASES_BUCKET = "WORKFLOW_LEASES"
KEYS_BUCKET = "WORKFLOW_KEYS"
SNAPSHOTS_BUCKET = "WORKFLOW_SNAPSHOTS"
BUCKETS = (RUNS_BUCKET, LEASES_BUCKET, KEYS_BUCKET, SNAPSHOTS_BUCKET)
STREAMS = (HISTORY_STREAM, TASKS_STREAM)
SNAPSHOT_EVERY = 500
WRONG_LAST_SEQUENCE = 10071
EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
READ_BATCH = 1000
APPEND_TIMEOUT_S = 5.0
# A lease key is rewritten at every renewal; one left behind by a finished run (whose driver
# does not spend a round trip deleting it) goes by itself after this long.
LEASE_KEY_MAX_AGE_S = 300.0


class StaleHistory(Exception):
    """An append found the run's history further on than this writer knew."""


class _Refused(Exception):
    """JetStream did not store a publish: its error code and description."""

    def __init__(self, code: int | None, description: str) -> None:
        super().__init__(description)
        self.code, self.description = code, description


@dataclass
class Lease:
    """The right to drive one run, until ``until`` unless renewed (services/workflow/driver.py)."""

    key: str
    owner: str
    revision: int
    until: float
    lost: bool = False


class Store:
    def __init__(self, *, history_max_bytes: int = -1) -> None:
        self.history_max_bytes = history_max_bytes
        self.kv: dict[str, Any] = {}

    async def setup(self, nc: Client, requester: Requester | None = None) -> None:
        """Use the connection ``nc`` (and ``requester``'s requests on it, for appends); create
        the streams and buckets if missing (every replica may)."""
        self.nc = nc
        self.requester = requester
        self.js: JetStreamContext = nc.jetstream()
        replicas = jetstream_replicas()  # a stream or bucket that exists keeps its own (nats stream edit)
        await self._stream(
            StreamConfig(
                name=HISTORY_STREAM,
                subjects=[subjects.WORKFLOW_HISTORY],
                storage=StorageType.FILE,
                num_replicas=replicas,
                allow_direct=True,
                # Full: new runs and steps are refused (typed, retryable) rather than old
                # histories dropped. Unlimited by default; operators size it (docs/workflows.md).
                max_bytes=self.history_max_bytes,
                discard=DiscardPolicy.NEW,
            )
        )
        await self._stream(
            StreamConfig(
                name=TASKS_STREAM,
                subjects=[subjects.WORKFLOW_TASKS, subjects.WORKFLOW_TIMERS],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                num_replicas=replicas,
                allow_msg_schedules=True,
            )
        )
        for bucket in BUCKETS:
            try:
                self.kv[bucket] = await self.js.key_value(bucket)
            except (BucketNotFoundError, NotFoundError):
                ttl = LEASE_KEY_MAX_AGE_S if bucket == LEASES_BUCKET else None
                self.kv[bucket] = await self.js.create_key_value(
                    KeyValueConfig(
                        bucket=bucket, history=1, storage=StorageType.FILE, direct=True, ttl=ttl, replicas=replicas
                    )
                )

    async def _stream(self, config: StreamConfig) -> None:
        try:
            await self.js.stream_info(config.name)
        except NotFoundError:
            with contextlib.suppress(BadRequestError):  # another replica created it meanwhile
                await self.js.add_stream(config)

    # ---- history --------------------------------------------------------------------

    async def append(self, tenant: str, run_id: str, events: list[dict[str, Any]], expected: int) -> int:
        """Append ``events`` (one message: all or none of them) after sequence ``expected`` of the
        run (0: the run's first message); :class:`StaleHistory` if the run has moved on since."""
        subject = subjects.workflow_history(tenant, run_id)
        try:
            return await self._acked(subject, to_json(events, fallback=str), {EXPECTED_LAST: str(expected)})
        except _Refused as refused:
            raise _refused(subject, refused.code, refused.description) from None

    async def _acked(self, subject: str, body: bytes, headers: dict[str, str] | None = None) -> int:
        """Publish ``body`` to a stream (a history, a bucket's key, the task queue) and return the
        sequence it was stored at; :class:`_Refused` with JetStream's error code if it was not.
        The same publish as nats-py's ``js.publish`` (and a KV put), on the service's lighter
        request path when it has one: every run makes ten or so of these."""
        if self.requester is None:
            try:
                return (await self.js.publish(subject, body, headers=headers, timeout=5)).seq
            except APIError as error:
                raise _Refused(error.err_code, error.description or "") from None
        try:
            msg = await self.requester.request(subject, body, APPEND_TIMEOUT_S, headers)
        except (NatsTimeout, NoRespondersError):
            raise Unavailable("the workflow's JetStream storage did not answer in time") from None
        ack = json.loads(msg.data)
        error = ack.get("error")
        if error is not None:
            raise _Refused(error.get("err_code"), error.get("description", ""))
        return int(ack["seq"])

    async def _stored(self, subject: str, body: bytes, headers: dict[str, str] | None = None) -> int:
        """:meth:`_acked` for a write with no condition of its own: a refusal (the stream full,
        say) is :class:`~contracts.errors.Unavailable`."""
        try:
            return await self._acked(subject, body, headers)
        except _Refused as refused:
            raise Unavailable(f"the workflow's JetStream storage refused a write: {refused.description}") from None

    async def read(self, tenant: str, run_id: str, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """The run's events after stream sequence ``after``, in order, each with the sequence of
        the message that holds it (batched direct gets: one round trip per thousand messages,
        no consumer)."""
        subject = subjects.workflow_history(tenant, run_id)
        events: list[tuple[int, dict[str, Any]]] = []
        start = after + 1
        while True:
            batch, pending = await self._batch(subject, start)
            events.extend(batch)
            if not batch or pending == 0:
                return events
            start = batch[-1][0] + 1

    async def _batch(self, subject: str, start: int) -> tuple[list[tuple[int, dict[str, Any]]], int]:
        request = {"seq": start, "next_by_subj": subject, "batch": READ_BATCH}
        found, pending = await self._direct(HISTORY_STREAM, request)
        events: list[tuple[int, dict[str, Any]]] = []
        for seq, _, data in found:
            recorded = json.loads(data)
            events.extend((seq, event) for event in (recorded if isinstance(recorded, list) else [recorded]))
        return events, pending

    async def _direct(
        self, stream: str, request: dict[str, Any]
    ) -> tuple[list[tuple[int, dict[str, str], bytes]], int]:
        """A batched direct get (nats-server 2.11+): the messages the request selects, sent to an
        inbox one after another and closed by an end-of-batch status, in one round trip."""
        inbox = self.nc.new_inbox()
        found: list[tuple[int, dict[str, str], bytes]] = []
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def collect(msg: Any) -> None:
            headers = msg.headers or {}
            if "Nats-Sequence" in headers:
                found.append((int(headers["Nats-Sequence"]), headers, msg.data))
                if headers.get("Nats-Num-Pending") == "0" and not done.done():
                    done.set_result(0)
            elif not done.done():  # 204 EOB (more may be pending) or 404 (nothing there)
                done.set_result(int(headers.get("Nats-Num-Pending", "0") or 0))

        sub = await self.nc.subscribe(inbox, cb=collect)
        try:
            await self.nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox)
            pending = await asyncio.wait_for(done, 10)
        except TimeoutError:
            raise Unavailable("the workflow state could not be read in time") from None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return found, pending

    # ---- snapshots ------------------------------------------------------------------

    async def snapshot(self, tenant: str, run_id: str) -> dict[str, Any] | None:
        return await self.get(SNAPSHOTS_BUCKET, f"{tenant}.{run_id}")

    async def save_snapshot(self, tenant: str, run_id: str, state: dict[str, Any]) -> None:
        await self.put(SNAPSHOTS_BUCKET, f"{tenant}.{run_id}", state)

    # ---- the run index --------------------------------------------------------------

    async def index(self, tenant: str, run_id: str, summary: dict[str, Any]) -> None:
        await self._stored(f"$KV.{RUNS_BUCKET}.{tenant}.{run_id}", _json(summary))

    async def runs(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        """The tenant's runs, newest first: the last entry of each of its index keys, in one
        batched direct get filtered by the tenant's key prefix (never another tenant's keys)."""
        prefix = f"$KV.{RUNS_BUCKET}.{subjects.validate_tenant_id(tenant)}.*"
        found, _ = await self._direct(f"KV_{RUNS_BUCKET}", {"multi_last": [prefix], "batch": 10_000})
        runs = [json.loads(data) for _, headers, data in found if data and headers.get("KV-Operation") is None]
        runs.sort(key=lambda run: run.get("started_at", 0), reverse=True)
        return runs[:limit]

    # ---- idempotency keys of starts ------------------------------------------------

    async def claim(self, tenant: str, key: str, run_id: str, input_hash: str) -> dict[str, Any] | None:
        """Claim ``key`` for a new run; the existing claim if another start already made it."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:40]
        name = f"{tenant}.{digest}"
        value = {"run_id": run_id, "input": input_hash}
        try:
            await self.kv[KEYS_BUCKET].create(name, _json(value))
        except KeyWrongLastSequenceError:
            return await self.get(KEYS_BUCKET, name)
        return None

    # ---- leases ---------------------------------------------------------------------

    async def lease(self, tenant: str, run_id: str, owner: str, ttl_s: float) -> Lease | None:
        """Take the lease of a run (free, expired or already ours), or None while another holds it."""
        kv = self.kv[LEASES_BUCKET]
        key = f"{tenant}.{run_id}"
        until = time.time() + ttl_s
        value = _json({"owner": owner, "until": until})
        try:  # a KV create: the key's first message (a released key's is its delete marker)
            revision = await self._acked(f"$KV.{LEASES_BUCKET}.{key}", value, {EXPECTED_LAST: "0"})
            return Lease(key, owner, revision, until)
        except _Refused as refused:
            if refused.code != WRONG_LAST_SEQUENCE:
                raise Unavailable(f"the lease could not be written: {refused.description}") from None
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:  # released meanwhile (a deleted key reads as not found)
            return await self._take_released(key, owner, ttl_s)
        held = json.loads(entry.value)
        if held.get("owner") != owner and held.get("until", 0) > time.time():
            return None
        try:
            revision = await kv.update(key, value, last=entry.revision)
        except KeyWrongLastSequenceError:
            return None  # someone else took it first
        return Lease(key, owner, revision, until)

    async def _take_released(self, key: str, owner: str, ttl_s: float) -> Lease | None:
        until = time.time() + ttl_s
        try:
            revision = await self.kv[LEASES_BUCKET].create(key, _json({"owner": owner, "until": until}))
        except KeyWrongLastSequenceError:
            return None
        return Lease(key, owner, revision, until)

    async def renew(self, lease: Lease, ttl_s: float) -> bool:
        until = time.time() + ttl_s
        value = _json({"owner": lease.owner, "until": until})
        try:  # a KV update after the revision this replica wrote last
            lease.revision = await self._acked(
                f"$KV.{LEASES_BUCKET}.{lease.key}", value, {EXPECTED_LAST: str(lease.revision)}
            )
        except _Refused as refused:
            if refused.code != WRONG_LAST_SEQUENCE:
                raise Unavailable(f"the lease could not be renewed: {refused.description}") from None
            lease.lost = True
            return False
        lease.until = until
        return True

    async def release(self, lease: Lease) -> None:
        if lease.lost:
            return
        with contextlib.suppress(Exception):  # unreleased, it expires on its own
            await self.kv[LEASES_BUCKET].delete(lease.key, last=lease.revision)

    # ---- wake-ups and timers ------------------------------------------------------

    async def wake(self, tenant: str, run_id: str) -> None:
        """Ask a replica to drive the run on now."""
        body = new_envelope_json(Kind.WORKFLOW_TASK, tenant, _json({"run_id": run_id}), run_id=run_id)
        await self._stored(subjects.workflow_task(tenant, run_id), body)

    async def wake_at(self, tenant: str, run_id: str, at: float) -> None:
        """Wake the run at ``at`` (replacing its earlier timer: one per run). The broker fires
        it within a few milliseconds of ``at``; one a little early only plans again."""
        stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = new_envelope_json(Kind.WORKFLOW_TASK, tenant, _json({"run_id": run_id}), run_id=run_id)
        headers = {"Nats-Schedule": f"@at {stamp}", "Nats-Schedule-Target": subjects.workflow_task(tenant, run_id)}
        await self._stored(subjects.workflow_timer(tenant, run_id), body, headers)

    async def cancel_timer(self, tenant: str, run_id: str) -> None:
        subject = subjects.workflow_timer(tenant, run_id)
        with contextlib.suppress(Exception):  # a timer left behind only wakes a finished run once
            if self.requester is None:
                await self.js.purge_stream(TASKS_STREAM, subject=subject)
                return
            purge = json.dumps({"filter": subject}).encode()
            await self.requester.request(f"$JS.API.STREAM.PURGE.{TASKS_STREAM}", purge, APPEND_TIMEOUT_S)

    # ---- KV helpers ---------------------------------------------------------------

    async def get(self, bucket: str, key: str) -> dict[str, Any] | None:
        try:
            entry = await self.kv[bucket].get(key)
        except KeyNotFoundError:
            return None
        return json.loads(entry.value) if entry.value else None

    async def put(self, bucket: str, key: str, value: dict[str, Any]) -> None:
        await self.kv[bucket].put(key, _json(value))


def _refused(subject: str, code: int | None, description: str) -> Exception:
    if code == WRONG_LAST_SEQUENCE:
        return StaleHistory(subject)
    return Unavailable(f"the workflow history could not be written: {description}")


def _json(value: Any) -> bytes:
    return to_json(value, fallback=str)


def input_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]
