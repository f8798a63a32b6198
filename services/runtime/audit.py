"""Appending to the tamper-evident audit trail (the ``AUDIT`` JetStream stream).

Recording is a non-blocking call on the hot path; a background task appends what accumulated
for each tenant as one entry. Each service keeps one chain per tenant, on its own subject
``t.<tenant>.audit.<service>``, and reads back only its own last entries (a direct get scoped to
that subject by its broker permissions: no service can read another's records).

Appends are pipelined across tenants: each window (``LINGER_S``) every chain with pending records
gets one entry, all of them are published before any acknowledgement is awaited, and the acks are
awaited together. One round trip per window, whatever the number of active tenants; each chain
is still its own sequence of messages on its own subject, verifiable alone. (An atomic batch was
measured too and not chosen: it fails whole on any one chain's conflict without naming the chain,
holds at most 1,000 messages, and made the broker no cheaper; docs/security.md.)

The replicas of a service append to the same chains, so each append states the sequence it
extends (``Nats-Expected-Last-Subject-Sequence``): when another replica got there first the
server refuses that append alone, and its entry is re-chained on the new head and sent in the
next round. Nothing is dropped: records leave memory only once the broker acknowledged them; a
failed append is tried again, with backoff, until it succeeds; an append whose acknowledgement was
lost is recognised by its hash at the chain's head instead of being written twice; on shutdown
what is pending is written before the connection closes, and what could not be is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
from dataclasses import dataclass
from typing import Any, Protocol

from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NoStreamResponseError
from pydantic_core import from_json

from contracts import subjects
from contracts.audit import STREAM, seal_json
from contracts.envelope import now_iso
from services.runtime import connection
from services.runtime.retry import RetryPolicy, call_with_retries
from services.runtime.settings import jetstream_replicas
from services.runtime.tasks import cancel_and_wait

WRONG_LAST_SEQUENCE = 10071
EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
# How long records gather before they are written: one entry per tenant per window instead of one
# per record keeps the trail off the request path's CPU (measured: +0.25 ms p50 without).
LINGER_S = 0.05
MAX_RECORDS_PER_ENTRY = 500
# A round holds at most this many entries in flight (the writer's memory, the broker's ingest
# queue); more chains than that with records pending take the next round, at once.
MAX_ENTRIES_PER_ROUND = 4096
# While it seals and sends a round the writer gives the event loop back this often (about 1 ms of
# work), so a round of thousands of entries does not hold up the requests served meanwhile.
YIELD_EVERY = 64
# An acknowledgement not back within this long: that append's outcome is unknown (AckLost).
ACK_TIMEOUT_S = 5.0
# A chain refused this often in one pass (other writers keep extending it) waits for the backoff.
MAX_CONFLICTS = 50
# A failed append is tried again with no limit and no deadline: records are never dropped. The
# pause starts where it always did (0.5 s) and grows to 5 s.
APPEND_RETRY = RetryPolicy(initial_interval_s=0.5, multiplier=2.0, max_interval_s=5.0, max_attempts=None, jitter=0.2)
# Bounded so a tenant cannot grow it without limit (a denial of service on the broker's disk):
# at most MAX_ENTRIES_PER_CHAIN entries per tenant and service, 90 days, MAX_BYTES in all; the
# oldest go first, and a chain stays verifiable from its oldest kept entry (docs/security.md).
MAX_ENTRIES_PER_CHAIN = 100_000
MAX_BYTES = 20 * 1024**3


def stream_config(replicas: int = 1) -> StreamConfig:
    """The ``AUDIT`` stream's configuration, with ``replicas`` copies (CORRAL_JETSTREAM_REPLICAS)."""
    return dataclasses.replace(STREAM_CONFIG, num_replicas=replicas)


STREAM_CONFIG = StreamConfig(
    name=STREAM,
    subjects=[subjects.ALL_AUDIT],
    storage=StorageType.FILE,
    deny_delete=True,  # records cannot be removed through the API
    deny_purge=True,
    max_age=90 * 24 * 3600,
    max_msgs_per_subject=MAX_ENTRIES_PER_CHAIN,
    max_bytes=MAX_BYTES,
    discard=DiscardPolicy.OLD,
    allow_direct=True,  # a chain's head is read with a direct get of its own subject
)


class ChainConflict(Exception):
    """Another writer extended the chain after its head was read: read it again and re-chain."""


class AckLost(TimeoutError):
    """No acknowledgement in time: the entry may be in the stream or not."""


@dataclass(slots=True)
class Append:
    """One entry on its way to its chain, and what became of it: ``seq`` or ``error``."""

    tenant: str
    subject: str
    body: bytes
    expected: int  # stream sequence of the chain's head it extends (0: the chain is empty)
    digest: str
    count: int  # how many records it holds: the first ``count`` pending for its tenant
    seq: int | None = None
    error: Exception | None = None

    def settle(self, msg: Any) -> None:
        _settle(self, msg.data)


class Chains(Protocol):
    """What the writer needs of the broker: :class:`JetStreamChains` (tests give it a fake)."""

    max_payload: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def append(self, appends: list[Append]) -> None:
        """Send every entry, then wait for their acknowledgements together; each gets its
        ``seq`` or its ``error``."""

    async def heads(self, chain_subjects: list[str]) -> list[tuple[int, str] | BaseException]:
        """(stream sequence, hash) of each chain's last entry, ``(0, "")`` for an empty chain."""


class JetStreamChains:
    """The ``AUDIT`` stream, pipelined: a round's requests (appends, or direct gets of heads) are
    published one after another, with reply subjects under one subscription, and their answers
    awaited together. No task and no ``asyncio.wait_for`` per request (services/runtime/tasks.py)."""

    def __init__(self, nc: Any, log: Any) -> None:
        self.nc = nc
        self.log = log
        self._prefix = ""
        self._tokens = itertools.count()
        self._waiting: dict[str, _Answered] = {}  # reply subject -> what its answer settles
        self._sending = False
        self._all_answered: asyncio.Future[None] | None = None
        self._subscription: Any = None

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    async def start(self) -> None:
        js = self.nc.jetstream()
        try:
            await js.add_stream(stream_config(jetstream_replicas()))
        except APIError:  # it exists, from an earlier version: bring its limits up to date
            try:
                await js.update_stream(stream_config(jetstream_replicas()))
            except APIError as error:  # an operator's own configuration
                self.log.warning("audit_stream_not_updated", reason=str(error))
        self._prefix = f"{self.nc.new_inbox()}."
        self._subscription = await self.nc.subscribe(f"{self._prefix}*", cb=self._on_queued_answer)
        if isinstance(self.nc, connection.Connection):
            self.nc.dispatch_directly(self._subscription, self._on_answer)

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def append(self, appends: list[Append]) -> None:
        await self._exchange(
            [
                (entry.subject, entry.body, {EXPECTED_LAST_SUBJECT_SEQUENCE: str(entry.expected)}, entry)
                for entry in appends
            ]
        )

    async def heads(self, chain_subjects: list[str]) -> list[tuple[int, str] | BaseException]:
        reads = [_HeadRead() for _ in chain_subjects]
        # A direct get naming the subject (the only form a service's permissions allow): its last message.
        await self._exchange(
            [
                (f"$JS.API.DIRECT.GET.{STREAM}.{subject}", b"", None, read)
                for subject, read in zip(chain_subjects, reads, strict=True)
            ]
        )
        return [read.error or read.head or AckLost("unanswered") for read in reads]

    async def _exchange(self, requests: list[tuple[str, bytes, dict[str, str] | None, _Answered]]) -> None:
        """Publish every request, then wait (up to ``ACK_TIMEOUT_S``) until all are answered."""
        self._all_answered = all_answered = asyncio.get_running_loop().create_future()
        waiting, sent = self._waiting, []
        self._sending = True
        try:
            for n, (subject, body, headers, answered) in enumerate(requests, 1):
                reply = f"{self._prefix}{next(self._tokens)}"
                waiting[reply] = answered
                try:
                    await self.nc.publish(subject, body, reply=reply, headers=headers)
                except Exception as error:  # a closed connection, a message over the broker's limit
                    del waiting[reply]
                    answered.error = error
                    continue
                sent.append(reply)
                if n % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            self._sending = False
            if waiting:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ACK_TIMEOUT_S):
                        await all_answered
        finally:
            self._sending = False
            self._all_answered = None
            for reply in sent:  # unanswered (a late answer is ignored: the head tells)
                answered = waiting.pop(reply, None)
                if answered is not None and answered.error is None:
                    answered.error = AckLost(f"no answer within {ACK_TIMEOUT_S:g} s")

    def _on_answer(self, msg: Any) -> bool:
        """An answer (from the read loop, when the connection hands it over directly)."""
        answered = self._waiting.pop(msg.subject, None)
        if answered is not None:
            answered.settle(msg)
            done = self._all_answered
            if not self._waiting and not self._sending and done is not None and not done.done():
                done.set_result(None)
        return True

    async def _on_queued_answer(self, msg: Any) -> None:
        self._on_answer(msg)


class _Answered(Protocol):
    error: Exception | None

    def settle(self, msg: Any) -> None: ...


@dataclass(slots=True)
class _HeadRead:
    """A direct get of a chain's last message: ``head`` (its sequence and hash), or ``error``."""

    head: tuple[int, str] | None = None
    error: Exception | None = None

    def settle(self, msg: Any) -> None:
        headers = msg.headers or {}
        if "Nats-Sequence" in headers:
            self.head = int(headers["Nats-Sequence"]), _stated_hash(msg.data)
        elif headers.get("Status") == "404":  # no message on that subject: an empty chain
            self.head = 0, ""
        else:
            self.error = APIError(
                description=f"direct get answered {headers.get('Status')} {headers.get('Description')}"
            )


def _settle(entry: Append, data: bytes) -> None:
    """What the stream answered to an append: its sequence, or why not."""
    try:
        answer = json.loads(data)
    except ValueError:  # an empty status message: no stream took it
        entry.error = NoStreamResponseError()
        return
    error = answer.get("error")
    if error is None:
        entry.seq = answer["seq"]
    elif error.get("err_code") == WRONG_LAST_SEQUENCE:
        entry.error = ChainConflict(error.get("description", "wrong last sequence"))
    else:
        try:
            APIError.from_error(error)  # raises the typed error
        except APIError as typed:
            entry.error = typed


def _stated_hash(raw: bytes) -> str:
    """The hash an entry states. An entry that is not one (forged or damaged: ``corral audit``
    reports it) is extended all the same: a reader checks no link past an unreadable entry."""
    with contextlib.suppress(ValueError):
        entry = from_json(raw)
        if isinstance(entry, dict) and isinstance(entry.get("hash"), str):
            return entry["hash"]
    return ""


class AuditTrail:
    """One service's audit writer: :meth:`record` on the hot path, a background task appending
    each window's records to their tenants' chains."""

    def __init__(self, nc: Any, service: str, log: Any, chains: Chains | None = None) -> None:
        self.nc = nc
        self.service = service
        self.log = log
        self.chains: Chains = chains if chains is not None else JetStreamChains(nc, log)
        self._pending: dict[str, list[dict[str, Any]]] = {}  # records leave only once acknowledged
        self._heads: dict[str, tuple[int, str]] = {}  # tenant -> (stream sequence, hash) of its last entry
        # tenant -> (hash, records) of an entry whose acknowledgement was lost: written if the head is it
        self._unsure: dict[str, tuple[str, int]] = {}
        self._wake = asyncio.Event()
        self._passes = 0  # write passes begun; each takes every chain pending as it begins
        self._passes_done = 0
        self._pass_done = asyncio.Event()
        self._flush_now = asyncio.Event()
        self._closing = False
        self._due: dict[str, int] = {}  # tenant -> records of the current pass not written yet
        self._task: asyncio.Task[None] | None = None
        # What the writer did: tests count round trips, scripts/audit_cost.py reports them.
        self.stats = {"round_trips": 0, "entries": 0, "conflicts": 0}

    async def start(self) -> None:
        await self.chains.start()
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    def record(
        self,
        tenant: str,
        action: str,
        outcome: str,
        *,
        principal: str | None = None,
        run_id: str | None = None,
        **detail: Any,
    ) -> None:
        """Queue one record for ``tenant`` (already validated: it came from a subject)."""
        at = now_iso()  # the same text as datetime.now(UTC).isoformat(timespec="microseconds"), cheaper
        # A plain dict with every AuditRecord field: records are written, not read, on this path.
        record = {
            "at": at,
            "service": self.service,
            "action": action,
            "outcome": outcome,
            "principal": principal,
            "run_id": run_id,
            "detail": detail,
        }
        self._pending.setdefault(tenant, []).append(record)
        self._wake.set()

    async def stop(self, timeout: float = 10.0) -> None:
        """Write what is pending (for up to ``timeout`` seconds), then stop the writer."""
        if self._task is None:
            return
        self._closing = True  # the writer ends by itself once nothing is pending
        self._flush_now.set()
        self._wake.set()
        await asyncio.wait({self._task}, timeout=timeout)
        # Past the timeout it is cancelled until it has ended: one cancellation can be lost
        # (services/runtime/tasks.py), and a writer that lost one waited for ever.
        try:
            await cancel_and_wait(self._task)
        except Exception as error:
            self.log.error("audit_writer_failed", error=str(error))
        await self.chains.stop()
        if self._pending:
            self.log.error("audit_records_unwritten", tenants=sorted(self._pending))

    async def flushed(self, timeout: float = 10.0) -> None:
        """Wait until everything recorded so far is written (now, not after the linger window)."""
        if not self._pending:
            return
        wanted = self._passes + 1  # the next pass to begin takes every chain pending now
        self._flush_now.set()
        self._wake.set()  # (one begins even if nothing is recorded meanwhile)
        async with asyncio.timeout(timeout):
            while self._passes_done < wanted:
                self._pass_done.clear()
                await self._pass_done.wait()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if not self._flush_now.is_set() and not self._closing:
                with contextlib.suppress(TimeoutError):  # gather more records, unless asked to flush now
                    async with asyncio.timeout(LINGER_S):
                        await self._flush_now.wait()
            self._flush_now.clear()
            self._wake.clear()
            self._passes += 1
            # Returns only when what was due is written: a pass that failed is tried again, for ever.
            await call_with_retries(self._drain, APPEND_RETRY, retry_if=_always)
            self._passes_done += 1
            self._pass_done.set()
            if self._closing and not self._pending:  # (records that came meanwhile have set _wake)
                return

    async def _drain(self) -> None:
        """Append the records pending as the pass began, a round at a time (a chain with more
        than an entry holds, or re-chained, takes the next round at once; what was recorded since
        goes along in its chain's entries, or waits for the next window); raise the first failure
        once the other chains are written."""
        self._due = {tenant: len(records) for tenant, records in self._pending.items()}
        due = self._due
        failed: dict[str, Exception] = {}
        conflicts: dict[str, int] = {}
        while tenants := list(
            itertools.islice(
                (tenant for tenant in self._pending if due.get(tenant, 0) > 0 and tenant not in failed),
                MAX_ENTRIES_PER_ROUND,
            )
        ):
            await self._round(tenants, failed, conflicts)
        if failed:
            raise next(iter(failed.values()))

    async def _round(self, tenants: list[str], failed: dict[str, Exception], conflicts: dict[str, int]) -> None:
        """An entry for each of ``tenants``' chains, all sent together: one round trip (and one
        more first, to read the heads not known yet, all together too)."""
        problems: dict[str, Exception] = {}
        unknown = [tenant for tenant in tenants if tenant not in self._heads]
        if unknown:
            self.stats["round_trips"] += 1
            heads = await self.chains.heads([subjects.audit(tenant, self.service) for tenant in unknown])
            for tenant, head in zip(unknown, heads, strict=True):
                if isinstance(head, Exception):
                    problems[tenant] = head
                elif isinstance(head, BaseException):  # cancelled: stopping
                    raise head
                else:
                    self._took_head(tenant, head)
        appends = []
        room = self.chains.max_payload - 4096  # the headers, and the broker's framing
        for tenant in tenants:
            records = self._pending.get(tenant)
            if not records or tenant in problems:  # (an entry found written may have emptied it)
                continue
            sequence, previous = self._heads[tenant]
            count = min(len(records), MAX_RECORDS_PER_ENTRY)
            digest, body = seal_json(tenant, previous, records[:count])
            while len(body) > room and count > 1:  # large records: fewer per entry
                count //= 2
                digest, body = seal_json(tenant, previous, records[:count])
            appends.append(Append(tenant, subjects.audit(tenant, self.service), body, sequence, digest, count))
        if appends:
            self.stats["round_trips"] += 1
            await self.chains.append(appends)
        for entry in appends:
            if entry.seq is not None:
                self._written(entry.tenant, entry.seq, entry.digest, entry.count)
                continue
            del self._heads[entry.tenant]  # read again before the next try
            if isinstance(entry.error, ChainConflict):  # re-chained on the new head next round
                self.stats["conflicts"] += 1
                conflicts[entry.tenant] = conflicts.get(entry.tenant, 0) + 1
                if conflicts[entry.tenant] >= MAX_CONFLICTS:
                    problems[entry.tenant] = RuntimeError("audit chain contended too long")
                continue
            if isinstance(entry.error, AckLost):
                self._unsure[entry.tenant] = (entry.digest, entry.count)
            problems[entry.tenant] = entry.error or RuntimeError("append failed")
        if problems:
            tenant, error = next(iter(problems.items()))
            self.log.warning("audit_append_failed", tenant_id=tenant, tenants=len(problems), error=str(error))
            failed.update(problems)

    def _took_head(self, tenant: str, head: tuple[int, str]) -> None:
        unsure = self._unsure.pop(tenant, None)
        if unsure is not None and unsure[0] == head[1]:  # the entry whose acknowledgement was lost is there
            self._written(tenant, head[0], head[1], unsure[1])
        else:
            self._heads[tenant] = head

    def _written(self, tenant: str, sequence: int, digest: str, count: int) -> None:
        self._heads[tenant] = (sequence, digest)
        self.stats["entries"] += 1
        if tenant in self._due:
            self._due[tenant] -= count
        records = self._pending.get(tenant)
        if records is not None:
            del records[:count]
            if not records:
                del self._pending[tenant]


def _always(error: Exception) -> bool:
    """Every failed append is worth another try: the alternative is a lost record."""
    return True
