"""Admission and route selection, by rules only: no model ever picks a tenant or a route.

No NATS here; the handler feeds it the tenant from the subject and the validated request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from contracts.definitions import Catalog, RateLimit, Route, TenantPolicy
from contracts.errors import CorralError, Forbidden, InvalidRequest, NotFound, RateLimited
from contracts.tenants import is_tenant_id


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per tenant, in memory. With ``shares`` replicas running, each takes its
    share of the rate and the burst, so together they admit the tenant's limit: the broker's
    queue group spreads requests over the replicas evenly on average (not exactly: a replica that
    gets more than its share of one tenant's requests refuses some early)."""

    def __init__(self, clock=time.monotonic, shares: Callable[[], int] = lambda: 1) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._clock = clock
        self._shares = shares

    def admit(self, tenant: str, limit: RateLimit) -> None:
        now = self._clock()
        shares = max(1, self._shares())
        rate = limit.per_second / shares
        burst = max(1.0, limit.burst / shares)
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(tokens=burst, updated=now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            raise RateLimited(f"tenant {tenant!r} is over its rate limit of {limit.per_second:g} requests/s")
        bucket.tokens -= 1.0


@dataclass(frozen=True)
class Decision:
    target: str
    route: Route


class Router:
    """Decides, for one tenant's request, whether it is admitted and which route serves it."""

    def __init__(self, catalog: Catalog, limiter: RateLimiter | None = None) -> None:
        self.catalog = catalog
        self.limiter = limiter or RateLimiter()

    def policy_for(self, tenant: str) -> TenantPolicy:
        policy = self.catalog.policy(tenant)
        if policy is None:
            raise Forbidden(f"tenant {tenant!r} has no routing rules")
        return policy

    def admit(self, tenant: str) -> CorralError | None:
        """The tenant's rate limit, checked from the subject before the request is decoded (so a
        flood past it costs a dict lookup per message); None: go on. An unknown tenant goes on
        here and is refused by :meth:`decide`."""
        policy = self.catalog.policy(tenant) if is_tenant_id(tenant) else None
        if policy is None:
            return None
        try:
            self.limiter.admit(tenant, policy.rate_limit)
        except RateLimited as error:
            return error
        return None

    def decide(self, tenant: str, target: str | None, input_bytes: int) -> Decision:
        """Which route serves an admitted request (the rate limit was :meth:`admit`'s)."""
        policy = self.policy_for(tenant)
        if input_bytes > policy.max_input_bytes:
            raise InvalidRequest(f"input of {input_bytes} bytes is over the tenant's limit of {policy.max_input_bytes}")
        name = target or policy.default_route
        if name is None:
            raise InvalidRequest("no target given and the tenant has no default route")
        route = policy.routes.get(name)
        if route is None:
            # The same answer whether or not another tenant has a target of that name: a tenant
            # cannot learn other tenants' graph names by asking.
            raise NotFound(f"unknown target {name!r}")
        return Decision(target=name, route=route)
