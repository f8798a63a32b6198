"""Reading and verifying a tenant's audit trail (``corral audit``), as the operator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nats
from nats.js.errors import NotFoundError

from contracts import subjects
from contracts.audit import STREAM, AuditEntry, ChainProblem, verify_trail


@dataclass
class AuditReport:
    entries: list[tuple[int, AuditEntry | None]]
    problems: list[ChainProblem]

    @property
    def records(self) -> list[Any]:
        return [record for _, entry in self.entries if entry is not None for record in entry.records]


async def read_trail(url: str, user: str, password: str, tenant: str) -> AuditReport:
    """Every entry of ``tenant``'s chain in stream order, and what is wrong with the chain."""
    nc = await nats.connect(url, user=user, password=password, inbox_prefix=b"_INBOX._admin")
    try:
        return await read_trail_on(nc, tenant)
    finally:
        await nc.close()


async def read_trail_on(nc: nats.NATS, tenant: str) -> AuditReport:
    """The same, on an open connection of the operator's (``corral audit`` opens its own)."""
    js = nc.jetstream()
    info = await js.stream_info(STREAM)
    raw: list[tuple[int, str, bytes]] = []
    sequence = 0
    while True:
        try:
            message = await js.get_msg(STREAM, seq=sequence + 1, subject=subjects.tenant_audit(tenant), next=True)
        except NotFoundError:
            break
        sequence = message.seq
        raw.append((message.seq, message.subject, message.data))
    # Nothing ever left the stream (its limits removed nothing): every chain must start at its
    # first entry. Otherwise a chain may start after older entries that the limits removed.
    problems = verify_trail(tenant, raw, starts_at_first=info.state.first_seq <= 1)
    entries = []
    for seq, _, data in raw:
        try:
            entries.append((seq, AuditEntry.model_validate_json(data)))
        except ValueError:
            entries.append((seq, None))
    return AuditReport(entries=entries, problems=problems)
