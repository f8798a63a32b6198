"""The operator's side of the tenant registry (``contracts/registry.py``): seed, add, update,
remove and list tenants while the system runs, as ``corral tenant ...`` and ``corral up`` do.

Every write goes through the admin user (the operator's credential in the state directory), the
only user the broker lets write the registry. Each is checked first: the policy against its
model, and against the deployment's definitions (the graphs, workflows, swarms and tools it
names must exist, as the services check again before they take it). Writes are compare-and-set
on the key's revision, so two operators changing one tenant at once cannot lose either change
silently: the second is refused and says so. Each write is recorded in the tenant's audit chain
``operator`` (``t.<tenant>.audit.operator``), which ``corral audit`` reads with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as JsNotFoundError

from contracts import subjects
from contracts.audit import STREAM as AUDIT_STREAM
from contracts.audit import AuditEntry, seal_json
from contracts.definitions import Catalog, TenantPolicy
from contracts.envelope import now_iso
from contracts.errors import Conflict, InvalidRequest, NotFound
from contracts.registry import AUDIT_SERVICE, BUCKET, HISTORY, STREAM, RegistryEntry, policy_digest, read_entry
from contracts.tenants import validate_tenant_id
from services.runtime.audit import WRONG_LAST_SEQUENCE
from services.runtime.manifest import registry_read_api

CONCURRENCY = 256  # registry writes in flight at once while seeding many tenants
LIST_TIMEOUT_S = 5.0


def admin_registry_api() -> tuple[str, ...]:
    """What the admin user needs to keep the registry and record its changes: what a service
    reads it with, and writing it (keys, creating the bucket, direct gets of one key)."""
    return (
        *registry_read_api(),
        f"$KV.{BUCKET}.>",
        f"$JS.API.STREAM.CREATE.{STREAM}",
        f"$JS.API.DIRECT.GET.{STREAM}.>",
        f"$JS.API.STREAM.CREATE.{AUDIT_STREAM}",  # before a fresh system's services create it
        subjects.service_audit(AUDIT_SERVICE),
        f"$JS.API.DIRECT.GET.{AUDIT_STREAM}.{subjects.service_audit(AUDIT_SERVICE)}",
    )


def check_policy(policy: TenantPolicy, catalog: Catalog | None) -> None:
    """Raise :class:`InvalidRequest` listing what the deployment's definitions lack for ``policy``."""
    if catalog is None:
        return
    problems = catalog.tenant_problems(policy)
    if problems:
        raise InvalidRequest("; ".join(message for _, message, _ in problems))


@dataclass
class Listed:
    tenant: str
    entry: RegistryEntry | None  # None: a value that cannot be read (the services refuse it too)
    revision: int


@dataclass
class SeedReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # changed by an operator since: not overwritten
    unchanged: int = 0


class Registry:
    """The registry through an admin connection ``nc``."""

    def __init__(self, nc: Any, operator: str = "operator") -> None:
        self.nc = nc
        self.operator = operator
        self.js = nc.jetstream()
        self.kv: Any = None
        self._heads: dict[str, tuple[int, str]] = {}

    async def open(self, *, create: bool = True) -> Registry:
        """Open the registry (``create``: create it if there is none yet), and make sure the
        audit stream its changes are recorded in exists (a fresh system's services create it a
        moment later, with the same configuration)."""
        from services.runtime.audit import stream_config
        from services.runtime.settings import jetstream_replicas

        try:
            await self.js.stream_info(AUDIT_STREAM)
        except JsNotFoundError:
            with contextlib.suppress(BadRequestError):  # created meanwhile by a service
                await self.js.add_stream(stream_config(jetstream_replicas()))
        try:
            self.kv = await self.js.key_value(BUCKET)
        except BucketNotFoundError:
            if not create:
                raise NotFound("no tenant registry yet (corral up or corral tenant seed creates it)") from None
            replicas = jetstream_replicas()
            config = KeyValueConfig(
                bucket=BUCKET, history=HISTORY, storage=StorageType.FILE, direct=True, replicas=replicas
            )
            self.kv = await self.js.create_key_value(config)
        return self

    # ---- reading ------------------------------------------------------------------------

    async def listing(self) -> list[Listed]:
        """Every tenant in the registry (removed ones too: their policy is None), by id."""
        found: dict[str, Listed] = {}
        watcher = await self.kv.watch(">", inactive_threshold=30)
        try:
            while True:
                entry = await watcher.updates(timeout=LIST_TIMEOUT_S)
                if entry is None:
                    break
                if entry.operation in ("DEL", "PURGE"):
                    found.pop(entry.key, None)
                    continue
                found[entry.key] = Listed(entry.key, _readable(entry.value), int(entry.revision))
        finally:
            await watcher.stop()
        return [found[key] for key in sorted(found)]

    async def get(self, tenant: str) -> Listed | None:
        try:
            entry = await self.kv.get(validate_tenant_id(tenant))
        except KeyNotFoundError:
            return None
        return Listed(tenant, _readable(entry.value), int(entry.revision))

    # ---- writing ------------------------------------------------------------------------

    async def add(self, policy: TenantPolicy, catalog: Catalog | None) -> int:
        """A tenant the registry does not have (a removed one may be added again)."""
        check_policy(policy, catalog)
        current = await self.get(policy.tenant)
        if current is not None and current.entry is not None and current.entry.policy is not None:
            raise Conflict(f"tenant {policy.tenant!r} exists: use corral tenant update")
        return await self._write(policy.tenant, policy, "tenant_added", current.revision if current else 0)

    async def update(self, policy: TenantPolicy, catalog: Catalog | None, *, revision: int | None = None) -> int:
        """Replace a tenant's policy; ``revision``: only if it is still that one."""
        check_policy(policy, catalog)
        current = await self.get(policy.tenant)
        if current is None or current.entry is None or current.entry.policy is None:
            raise NotFound(f"tenant {policy.tenant!r} is not in the registry: use corral tenant add")
        if revision is not None and revision != current.revision:
            raise Conflict(f"tenant {policy.tenant!r} changed since revision {revision} (now {current.revision})")
        return await self._write(policy.tenant, policy, "tenant_updated", current.revision)

    async def remove(self, tenant: str) -> int:
        """Remove a tenant (kept as a removal, so a file declaring it does not bring it back)."""
        current = await self.get(tenant)
        if current is None or current.entry is None or current.entry.policy is None:
            raise NotFound(f"tenant {tenant!r} is not in the registry")
        return await self._write(tenant, None, "tenant_removed", current.revision)

    async def seed(self, catalog: Catalog) -> SeedReport:
        """Write the files' tenants the registry lacks, and update those it took from the files
        before whose file policy changed; never one an operator changed (reported as kept)."""
        report = SeedReport()
        existing = {listed.tenant: listed for listed in await self.listing()}
        todo: list[tuple[str, TenantPolicy, str, int, str]] = []
        for tenant, policy in catalog.tenants.items():
            digest = policy_digest(policy)
            listed = existing.get(tenant)
            if listed is None:
                todo.append((tenant, policy, "tenant_seeded", 0, digest))
                report.created.append(tenant)
            elif listed.entry is not None and listed.entry.origin == "file":
                if listed.entry.digest != digest:
                    todo.append((tenant, policy, "tenant_seeded", listed.revision, digest))
                    report.updated.append(tenant)
                else:
                    report.unchanged += 1
            else:
                report.kept.append(tenant)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(tenant: str, policy: TenantPolicy, action: str, revision: int, digest: str) -> None:
            async with limit:
                await self._write(tenant, policy, action, revision, origin="file", digest=digest)

        await asyncio.gather(*(one(*item) for item in todo))
        return report

    async def _write(
        self,
        tenant: str,
        policy: TenantPolicy | None,
        action: str,
        revision: int,
        *,
        origin: str = "operator",
        digest: str = "",
    ) -> int:
        entry = RegistryEntry(
            policy=policy,
            origin=origin,  # type: ignore[arg-type]
            changed_by="seed" if origin == "file" else self.operator,
            at=now_iso(),
            digest=digest,
        )
        value = entry.model_dump_json(exclude_none=False).encode()
        try:
            if revision:
                written = await self.kv.update(tenant, value, last=revision)
            else:
                written = await self.kv.create(tenant, value)
        except KeyWrongLastSequenceError:
            raise Conflict(f"tenant {tenant!r} was changed by someone else meanwhile: read it and try again") from None
        detail = {"revision": written, "origin": origin}
        if policy is not None:
            detail["policy"] = policy_digest(policy)
        await self._audit(tenant, action, detail)
        return int(written)

    async def _audit(self, tenant: str, action: str, detail: dict[str, Any]) -> None:
        """Append one record to the tenant's ``operator`` chain (single writer per chain through
        the expected last sequence: a concurrent operator's append makes this one re-chain)."""
        subject = subjects.audit(tenant, AUDIT_SERVICE)
        record = {
            "at": now_iso(),
            "service": AUDIT_SERVICE,
            "action": action,
            "outcome": "ok",
            "principal": self.operator,
            "run_id": None,
            "detail": detail,
        }
        for _ in range(20):
            sequence, previous = self._heads.get(tenant) or await self._head(subject)
            digest, body = seal_json(tenant, previous, [record])
            try:
                ack = await self.js.publish(
                    subject, body, headers={"Nats-Expected-Last-Subject-Sequence": str(sequence)}, timeout=5
                )
            except BadRequestError as error:
                if error.err_code != WRONG_LAST_SEQUENCE:
                    raise
                self._heads.pop(tenant, None)
                continue
            self._heads[tenant] = (ack.seq, digest)
            return
        raise Conflict(f"the audit chain of tenant {tenant!r} stayed contended; the change is written, not recorded")

    async def _head(self, subject: str) -> tuple[int, str]:
        try:
            message = await self.js.get_last_msg(AUDIT_STREAM, subject, direct=True)
        except JsNotFoundError:
            return 0, ""
        return message.seq, AuditEntry.model_validate_json(message.data).hash


def _readable(value: bytes | None) -> RegistryEntry | None:
    try:
        return read_entry(value or b"")
    except ValueError:
        return None


def policies_from(data: Any) -> list[TenantPolicy]:
    """Tenant policies from a parsed file: one policy mapping, or ``{"tenants": [...]}``."""
    if isinstance(data, dict) and "tenants" in data and isinstance(data["tenants"], list):
        items = data["tenants"]
    elif isinstance(data, dict):
        items = [data]
    else:
        raise InvalidRequest("expected a tenant policy (a mapping) or a mapping with a 'tenants' list")
    return [TenantPolicy.model_validate(item) for item in items]


def shown(listed: Listed) -> dict[str, Any]:
    """A registry entry as ``corral tenant list --json`` and ``show --json`` print it."""
    entry = listed.entry
    if entry is None:
        return {"tenant": listed.tenant, "revision": listed.revision, "unreadable": True}
    return {
        "tenant": listed.tenant,
        "revision": listed.revision,
        "removed": entry.policy is None,
        "origin": entry.origin,
        "changed_by": entry.changed_by,
        "at": entry.at,
        "policy": json.loads(entry.policy.model_dump_json()) if entry.policy else None,
    }
