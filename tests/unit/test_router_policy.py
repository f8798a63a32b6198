"""Admission and route selection by rules."""

import pytest

from contracts.definitions import RateLimit
from contracts.errors import Forbidden, InvalidRequest, NotFound, RateLimited
from corral.demo import DEFINITIONS as DEFAULT_DEFINITIONS
from services.router.policy import RateLimiter, Router
from services.runtime.catalog import load_catalog


@pytest.fixture
def router():
    return Router(load_catalog(DEFAULT_DEFINITIONS))


def test_no_target_uses_the_tenants_default_route(router):
    decision = router.decide("acme", None, 10)
    assert decision.target == "order_status" and decision.route.graph == "order_status"


def test_an_unknown_tenant_is_forbidden(router):
    with pytest.raises(Forbidden, match="no routing rules"):
        router.decide("initech", None, 10)


def test_an_unknown_target_is_not_found(router):
    with pytest.raises(NotFound, match="unknown target 'nope'"):
        router.decide("acme", "nope", 10)


def test_an_oversized_input_is_refused(router):
    with pytest.raises(InvalidRequest, match="over the tenant's limit"):
        router.decide("acme", None, 10**7)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_rate_limit_refuses_past_the_burst_and_refills_with_time():
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    limit = RateLimit(per_second=2, burst=3)
    for _ in range(3):
        limiter.admit("acme", limit)
    with pytest.raises(RateLimited):
        limiter.admit("acme", limit)
    limiter.admit("globex", limit)  # tenants have separate buckets
    clock.now = 0.5
    limiter.admit("acme", limit)
