"""Admission and route selection, by rules only: no model ever picks a tenant or a route.

No NATS here; the handler feeds it the tenant from the subject and the validated request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_json

from contracts.definitions import Catalog, Pattern, RateLimit, Route, TenantPolicy
from contracts.errors import CorralError, Forbidden, InvalidRequest, NotFound, RateLimited
from contracts.expressions import compile_expression, evaluate
from contracts.tenants import is_tenant_id
from services.runtime.json_schema import CompiledSchema


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
    # Why this route: "target" (named by the request), "when" (its condition held) or "default_route".
    chosen_by: str = "target"
    # The routes whose conditions were tried first and did not hold (chosen_by "when" or "default_route").
    passed: tuple[str, ...] = ()


class Router:
    """Decides, for one tenant's request, whether it is admitted and which route serves it."""

    def __init__(self, catalog: Catalog, limiter: RateLimiter | None = None) -> None:
        self.catalog = catalog
        self.limiter = limiter or RateLimiter()
        # Each tenant's route conditions, compiled once, in the order its routes are declared.
        self._conditions = {tenant: _conditions(policy) for tenant, policy in catalog.tenants.items()}
        # The input schemas of the graphs, compiled once (a workflow checks its own at start).
        self._inputs = {
            name: CompiledSchema(graph.input_schema)
            for name, graph in catalog.graphs.items()
            if graph.input_schema is not None
        }

    def tenants_changed(self, catalog: Catalog, changed: frozenset[str]) -> None:
        """The tenant registry changed these tenants' policies (a request already decided keeps
        the route it was given)."""
        self.catalog = catalog
        for tenant in changed:
            policy = catalog.tenants.get(tenant)
            if policy is None:
                self._conditions.pop(tenant, None)
            else:
                self._conditions[tenant] = _conditions(policy)

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

    def decide(
        self,
        tenant: str,
        target: str | None,
        input: Mapping[str, Any],
        message_bytes: int | None = None,
        principal: str | None = None,
        scopes: frozenset[str] = frozenset(),
    ) -> Decision:
        """Which route serves an admitted request (the rate limit was :meth:`admit`'s), once its
        input is within the tenant's size limit and the route's graph's input schema.

        The limit counts the input's JSON, not the envelope around it; ``message_bytes`` (the
        whole message) saves measuring an input whose message is within the limit already.

        With no ``target``, the tenant's routes that carry a ``when`` are tried in their order over
        the input and the verified ``principal`` and ``scopes`` (from the request's subject: never
        what the input says); the first that holds serves it, else the default route. A target
        named directly is served only if its own ``when`` holds (the same ``not_found`` as an
        unknown one otherwise). No model is asked."""
        policy = self.policy_for(tenant)
        if message_bytes is None or message_bytes > policy.max_input_bytes:
            size = len(to_json(input))
            if size > policy.max_input_bytes:
                raise InvalidRequest(f"input of {size} bytes is over the tenant's limit of {policy.max_input_bytes}")
        conditions = self._conditions.get(tenant)
        if not conditions:  # the common case: no rules, nothing to evaluate or to build
            name = target or policy.default_route
            if name is None:
                raise InvalidRequest("no target given and the tenant has no default route")
            route = policy.routes.get(name)
            chosen_by, passed, held = ("target" if target else "default_route"), (), True
        else:
            route, name, chosen_by, passed, held = self._by_rules(policy, conditions, target, input, principal, scopes)
        if route is None or not held:
            # The same answer whether or not another tenant has a target of that name (a tenant
            # cannot learn other tenants' graph names by asking), or its condition does not hold.
            raise NotFound(f"unknown target {name!r}")
        if route.pattern is Pattern.GRAPH and route.runs in self._inputs:
            error = self._inputs[route.runs].first_error(input)
            if error is not None:
                where = "".join(f"[{step!r}]" for step in error.absolute_path)
                raise InvalidRequest(f"the input of {name!r} does not match its schema: input{where}: {error.message}")
        return Decision(target=name, route=route, chosen_by=chosen_by, passed=tuple(passed))

    @staticmethod
    def _by_rules(
        policy: TenantPolicy,
        conditions: tuple[tuple[str, Any], ...],
        target: str | None,
        input: Mapping[str, Any],
        principal: str | None,
        scopes: frozenset[str],
    ) -> tuple[Route | None, str, str, list[str], bool]:
        """The route of a tenant that has rules: (route, name, chosen_by, rules passed, held)."""
        facts = {"input": input, "principal": {"id": principal, "scopes": sorted(scopes)}}
        passed: list[str] = []
        if target is not None:
            held = all(n != target or evaluate(c, facts) for n, c in conditions)
            return policy.routes.get(target), target, "target", passed, held
        for candidate, condition in conditions:
            if evaluate(condition, facts):
                return policy.routes.get(candidate), candidate, "when", passed, True
            passed.append(candidate)
        name = policy.default_route
        if name is None or name in passed:  # none, or the default route's own condition did not hold
            raise InvalidRequest("no route's condition holds and the tenant has no default route")
        return policy.routes.get(name), name, "default_route", passed, True


def _conditions(policy: TenantPolicy) -> tuple[tuple[str, Any], ...]:
    """A tenant's route conditions, compiled, in the order its routes are declared."""
    return tuple((name, compile_expression(r.when)) for name, r in policy.routes.items() if r.when)
