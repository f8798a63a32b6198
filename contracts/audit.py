"""Audit records and the per-tenant hash chain that makes deletions and alterations visible.

Records are appended in entries (one stream message each, a batch of records). Every entry
carries the hash of its tenant's previous entry, and its own hash over tenant, previous hash and
records, so removing or changing any entry breaks the chain at that point.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic_core import to_json

from contracts.tenants import TenantId

STREAM = "AUDIT"


class AuditRecord(BaseModel):
    """Who did what, when, with what outcome. Never secrets, never payload contents."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: str  # ISO 8601, UTC; a string so the hash does not depend on datetime formatting
    service: str
    action: str  # tool_call, guard_refused, tenant_override_attempt, ...
    outcome: str  # ok, refused, failed
    principal: str | None = None
    run_id: str | None = None
    detail: dict[str, JsonValue] = Field(default_factory=dict)


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: TenantId
    prev: str  # hash of the previous entry of its chain (the tenant's, of one service); "" for the first
    records: list[AuditRecord]
    hash: str


def _as_dicts(records: list[AuditRecord] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [record.model_dump(mode="json") if isinstance(record, AuditRecord) else record for record in records]


def entry_hash(tenant: str, prev: str, records: list[AuditRecord] | list[dict[str, Any]]) -> str:
    canonical = json.dumps(
        {"tenant_id": tenant, "prev": prev, "records": _as_dicts(records)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal(tenant: str, prev: str, records: list[AuditRecord] | list[dict[str, Any]]) -> AuditEntry:
    """An entry as a model (for readers and tests); written through :func:`seal_json`."""
    return AuditEntry.model_validate_json(seal_json(tenant, prev, _as_dicts(records))[1])


def seal_json(tenant: str, prev: str, records: list[dict[str, Any]]) -> tuple[str, bytes]:
    """(hash, message body) of an entry whose records are plain dicts with every record field:
    the writer's path, one serialisation for the hash and one for the body, no models."""
    digest = entry_hash(tenant, prev, records)
    # The body is not what is hashed (readers re-hash the parsed records canonically), so it can
    # come from pydantic-core's faster encoder.
    return digest, to_json({"tenant_id": tenant, "prev": prev, "records": records, "hash": digest})


@dataclass(frozen=True)
class ChainProblem:
    sequence: int
    problem: str


def verify_chain(tenant: str, entries: list[tuple[int, Any]], *, starts_at_first: bool = True) -> list[ChainProblem]:
    """Problems in a tenant's chain of ``(stream sequence, raw entry)``, in order; empty if intact.

    ``starts_at_first`` says the first entry must open the chain (nothing expired before it).
    """
    problems: list[ChainProblem] = []
    previous: str | None = "" if starts_at_first else None
    for sequence, raw in entries:
        try:
            entry = raw if isinstance(raw, AuditEntry) else AuditEntry.model_validate_json(raw)
        except ValueError:
            problems.append(ChainProblem(sequence, "unreadable entry"))
            previous = None
            continue
        if entry.tenant_id != tenant:
            problems.append(ChainProblem(sequence, f"entry belongs to tenant {entry.tenant_id!r}"))
        if entry.hash != entry_hash(entry.tenant_id, entry.prev, entry.records):
            problems.append(ChainProblem(sequence, "entry was altered (its hash does not match its content)"))
        if previous is not None and entry.prev != previous:
            problems.append(ChainProblem(sequence, "chain broken: an entry before this one was removed or altered"))
        previous = entry.hash
    return problems


def verify_trail(
    tenant: str, messages: list[tuple[int, str, Any]], *, starts_at_first: bool = True
) -> list[ChainProblem]:
    """Problems in a tenant's trail: ``(stream sequence, subject, raw entry)`` in stream order,
    one chain per subject (each service keeps its own chain of the tenant's records)."""
    chains: dict[str, list[tuple[int, Any]]] = {}
    for sequence, subject, raw in messages:
        chains.setdefault(subject, []).append((sequence, raw))
    problems = [
        problem for chain in chains.values() for problem in verify_chain(tenant, chain, starts_at_first=starts_at_first)
    ]
    return sorted(problems, key=lambda problem: problem.sequence)
