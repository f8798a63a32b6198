"""The tenant registry: every tenant's policy in JetStream KV, changed while the system runs.

Graphs, tools, workflows, swarms and the rest stay in definitions files; the tenants (their
routes, tools and limits) live in KV :data:`BUCKET`, one key per tenant id, so onboarding a
customer is a write, not an edit and a restart. Every replica of every service follows the bucket
and applies a change within milliseconds; a run already started keeps the policy it started with.

The files still count: the tenants they declare are the registry's seed (``corral up`` and
``corral tenant seed`` write those the registry lacks, and update those it took from the files
before, never one an operator changed), and a service that finds no registry serves the files'
tenants alone. A registry entry wins over a file's tenant of the same id; an entry whose
``policy`` is null removes the tenant, even one the files declare.

Only the operator (``corral tenant ...`` with the admin credential) and the seeding write the
bucket; the services may only read it (their broker permissions), so a compromised service cannot
widen a tenant's policy. Each change is recorded in the tenant's audit chain ``operator``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

from contracts.definitions import TenantPolicy

BUCKET = "TENANTS"
STREAM = f"KV_{BUCKET}"
HISTORY = 10  # earlier versions of each tenant kept in the bucket, for `corral tenant show --history`
AUDIT_SERVICE = "operator"  # the audit chain changes are recorded in: t.<tenant>.audit.operator

Origin = Literal["file", "operator"]


class RegistryEntry(BaseModel):
    """One tenant's registry value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: TenantPolicy | None  # None: the tenant is removed (even if a file declares it)
    origin: Origin  # "file": seeded from a definitions file (a later seed may update it)
    changed_by: str  # who wrote it: "seed" or the operator's name
    at: str  # when (ISO 8601, UTC)
    digest: str = ""  # of the file's policy it was seeded from (origin "file")


def read_entry(data: bytes) -> RegistryEntry:
    """Decode a registry value; raises pydantic's ValidationError for one that is not valid."""
    return RegistryEntry.model_validate_json(data)


def policy_digest(policy: TenantPolicy) -> str:
    """The digest a seeded entry records of the file policy it was written from."""
    return hashlib.sha256(policy.model_dump_json().encode()).hexdigest()[:32]


def seeded_from(data: bytes, digest: str) -> bool:
    """Whether a registry value is the file policy of digest ``digest`` as the seeding wrote it
    (origin ``file``, a policy, that digest): then a reader may take the file's policy as it is,
    without reading and checking the entry's copy of it again (with 10,000 tenants, about half a
    second of every service's start). Only the operator and the seeding write the bucket."""
    try:
        head = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return (
        isinstance(head, dict)
        and head.get("origin") == "file"
        and head.get("digest") == digest
        and isinstance(head.get("policy"), dict)
    )
