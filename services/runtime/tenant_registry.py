"""A service's live view of the tenants: the files' tenants overlaid by the registry's.

The tenant registry (``contracts/registry.py``, KV ``TENANTS``) changes while the system runs.
Every replica follows it with an ordered watcher and applies each change to its catalog at once::

    tenants = LiveTenants(catalog, log)                 # the files' catalog: graphs, tools, tenants
    tenants.on_change(lambda catalog, changed: ...)     # rebuild what the service derived per tenant
    tenants.start(nc)                                   # follows the bucket in the background
    await tenants.ready(timeout)                        # the registry read once (or found absent)

A registry policy is checked against the catalog's definitions (:meth:`Catalog.tenant_problems`)
before it is taken: one that names a graph or a tool this deployment does not have is refused
(``tenant_registry_rejected``, logged) and the tenant keeps the policy it had. A value that cannot
be read is refused the same way. A registry key that is deleted or purged takes the tenant back to
its files' policy (or removes it, if no file declares it).

Runs already started keep the :class:`~contracts.definitions.TenantPolicy` object they started
with: a change replaces the catalog, never a policy in place (both are immutable).

The watch, like a census's (``services/runtime/census.py``), reads the bucket from its start
after each reconnect (a broker restart loses an ephemeral consumer) and applies what changed
meanwhile, deletions included. With no bucket yet (nothing seeded), the files' tenants are the
whole truth: the view is ready at once and the bucket is looked for again every second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pydantic import ValidationError

from contracts.definitions import Catalog, RouteNeeds, TenantPolicy
from contracts.registry import BUCKET, policy_digest, read_entry, seeded_from
from contracts.tenants import is_tenant_id
from services.runtime.kv_follow import DELETES, follow_bucket
from services.runtime.tasks import keep_cancelling

Listener = Callable[[Catalog, frozenset[str]], None]


class PolicyView(Mapping[str, TenantPolicy]):
    """The current tenants of a :class:`LiveTenants` as a read-only mapping, always up to date
    (for code that takes a mapping of policies: the auth service's)."""

    def __init__(self, live: LiveTenants) -> None:
        self.live = live

    def __getitem__(self, tenant: str) -> TenantPolicy:
        return self.live.catalog.tenants[tenant]

    def __iter__(self) -> Iterator[str]:
        return iter(self.live.catalog.tenants)

    def __len__(self) -> int:
        return len(self.live.catalog.tenants)


class LiveTenants:
    """The tenants a service serves now (``catalog``), and who to tell when they change."""

    def __init__(self, catalog: Catalog, log: Any) -> None:
        self.files: dict[str, TenantPolicy] = dict(catalog.tenants)
        self.catalog = catalog
        self.log = log
        self.revision = 0  # the last registry revision applied
        self.absent = False  # no registry bucket (yet): the files' tenants only
        self._ready = asyncio.Event()
        self._from_registry: set[str] = set()  # tenants whose policy is the registry's now
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        # What each route target needs, for checking every registry policy against the same
        # definitions (only the tenants of ``catalog`` ever change here).
        self._needs: RouteNeeds = {}
        self._digests: dict[str, str] = {}  # of the files' policies (they do not change)

    # ---- what the services use -----------------------------------------------------------

    def policy(self, tenant: str) -> TenantPolicy | None:
        return self.catalog.tenants.get(tenant)

    def on_change(self, listener: Listener) -> None:
        """Call ``listener(catalog, changed tenants)`` after every change (in the event loop)."""
        self._listeners.append(listener)

    async def ready(self, timeout: float) -> bool:
        """Wait until the registry was read once (or found absent); False after ``timeout``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        return self._ready.is_set()

    # ---- applying the registry (no NATS) ---------------------------------------------------

    def apply(self, values: dict[str, bytes | None], revision: int = 0) -> frozenset[str]:
        """Apply registry values by tenant id (None: the key was deleted); returns the tenants
        whose policy changed, after telling the listeners."""
        self.revision = max(self.revision, revision)
        tenants = dict(self.catalog.tenants)
        changed: set[str] = set()
        for tenant, data in values.items():
            if not is_tenant_id(tenant):
                self.log.error("tenant_registry_rejected", key=tenant[:80], problems=["not a tenant id"])
                continue
            if data is None:
                self._from_registry.discard(tenant)
                policy = self.files.get(tenant)
            else:
                found = self._checked(tenant, data)
                if found is False:
                    continue  # refused: the tenant keeps what it had
                self._from_registry.add(tenant)
                policy = found
            if policy is None:
                if tenants.pop(tenant, None) is not None:
                    changed.add(tenant)
            elif tenants.get(tenant) != policy:
                tenants[tenant] = policy
                changed.add(tenant)
        if changed:
            self.catalog = self.catalog.with_tenants(tenants)
            for listener in self._listeners:
                try:
                    listener(self.catalog, frozenset(changed))
                except Exception:  # one listener's bug must not stop the others, nor the follower
                    self.log.exception("tenant_listener_failed", tenants=sorted(changed)[:20])
            self.log.info("tenants_changed", tenants=sorted(changed)[:20], count=len(changed), revision=self.revision)
        return frozenset(changed)

    def _checked(self, tenant: str, data: bytes) -> TenantPolicy | bool | None:
        """The registry's policy for ``tenant`` (None: removed), or False if it is refused."""
        own = self.files.get(tenant)
        if own is not None and seeded_from(data, self._digest(tenant, own)):
            return own  # the files' policy, read and checked at load: the same again
        try:
            entry = read_entry(data)
        except ValidationError as error:
            problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:5]]
            self.log.error("tenant_registry_rejected", tenant_id=tenant, problems=problems)
            return False
        if entry.policy is None:
            return None
        if entry.policy.tenant != tenant:
            self.log.error("tenant_registry_rejected", tenant_id=tenant, problems=["the policy names another tenant"])
            return False
        problems = self.catalog.tenant_problems(entry.policy, self._needs)
        if problems:
            self.log.error("tenant_registry_rejected", tenant_id=tenant, problems=[m for _, m, _ in problems][:5])
            return False
        return entry.policy

    def _digest(self, tenant: str, policy: TenantPolicy) -> str:
        digest = self._digests.get(tenant)
        if digest is None:
            digest = self._digests[tenant] = policy_digest(policy)
        return digest

    # ---- following the bucket ---------------------------------------------------------------

    def start(self, nc: Any) -> None:
        """Follow the registry on connection ``nc`` until :meth:`stop` (never raises)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(nc), name="tenant-registry")

    def stop(self) -> None:
        if self._task is not None:
            keep_cancelling(self._task)  # a cancellation nats-py's wait_for swallows is sent again
            self._task = None

    async def _run(self, nc: Any) -> None:
        await follow_bucket(nc, BUCKET, self._begin, log=self.log, absent=self._absent)

    def _absent(self) -> None:
        """No registry bucket (nothing seeded it), or no JetStream: the files are the whole truth
        until one appears."""
        if not self.absent:
            self.log.info("tenant_registry_absent", bucket=BUCKET, serving="the definitions files' tenants")
        self.absent = True
        self._ready.set()

    async def _begin(self, kv: Any) -> _Reading:
        return _Reading(self)


class _Reading:
    """One pass over the registry (services/runtime/kv_follow.py): the values read until it has
    caught up are applied as one change, with what the registry no longer holds taken back to
    the files; after that each update is applied as it comes."""

    def __init__(self, live: LiveTenants) -> None:
        self.live = live
        self.pending: dict[str, bytes | None] = {}
        self.caught = False

    def entry(self, entry: Any) -> None:
        value = None if entry.operation in DELETES else (entry.value or b"")
        revision = int(entry.revision or 0)
        if self.caught:
            self.live.apply({entry.key: value}, revision)
        else:
            self.pending[entry.key] = value
            self.live.revision = max(self.live.revision, revision)

    def caught_up(self) -> None:
        live = self.live
        for tenant in live._from_registry - set(self.pending):
            self.pending[tenant] = None  # removed from the registry while this replica was away
        live.absent = False
        live.apply(self.pending, live.revision)
        self.pending, self.caught = {}, True
        live._ready.set()
