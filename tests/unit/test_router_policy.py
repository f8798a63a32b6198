"""Admission and route selection by rules."""

import pytest

from contracts.definitions import Catalog, DefinitionsFile, RateLimit
from contracts.errors import Forbidden, InvalidRequest, NotFound, RateLimited
from corral.demo import DEFINITIONS as DEFAULT_DEFINITIONS
from services.router.policy import RateLimiter, Router
from services.runtime.catalog import load_catalog

LIMITED = {
    "graphs": [
        {
            "name": "echo",
            "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
            "entry": "say",
            "nodes": {"say": {"kind": "respond", "template": "{input.text}"}},
        }
    ]
}
TENANT = {"tenant": "small", "default_route": "echo", "routes": {"echo": {"graph": "echo"}}}


@pytest.fixture
def router():
    return Router(load_catalog(DEFAULT_DEFINITIONS))


def test_no_target_uses_the_tenants_default_route(router):
    decision = router.decide("acme", None, {"text": "where is A-1001?"})
    assert decision.target == "order_status" and decision.route.graph == "order_status"


def test_an_unknown_tenant_is_forbidden(router):
    with pytest.raises(Forbidden, match="no routing rules"):
        router.decide("initech", None, {})


def test_an_unknown_target_is_not_found(router):
    with pytest.raises(NotFound, match="unknown target 'nope'"):
        router.decide("acme", "nope", {})


def test_an_oversized_input_is_refused(router):
    with pytest.raises(InvalidRequest, match="over the tenant's limit"):
        router.decide("acme", None, {"text": "x" * 10**7})


def test_the_size_limit_counts_the_input_not_the_envelope_around_it():
    """An input just under the limit is admitted though its message, with the envelope's fields,
    is over it; one byte more than the limit is refused, however small its envelope."""
    catalog = Catalog.merge(
        [DefinitionsFile.model_validate({**LIMITED, "tenants": [{**TENANT, "max_input_bytes": 100}]})]
    )
    router = Router(catalog)
    fits = {"text": "x" * (100 - len('{"text":""}'))}
    assert router.decide("small", None, fits, message_bytes=100 + 400).target == "echo"
    with pytest.raises(InvalidRequest, match="input of 101 bytes is over the tenant's limit of 100"):
        router.decide("small", None, {"text": "x" * 90}, message_bytes=101)


def test_an_input_outside_the_graphs_input_schema_is_refused_naming_the_field():
    router = Router(Catalog.merge([DefinitionsFile.model_validate({**LIMITED, "tenants": [TENANT]})]))
    with pytest.raises(
        InvalidRequest, match=r"the input of 'echo' does not match its schema: input: 'text' is a required"
    ):
        router.decide("small", None, {"txt": "hello"})
    with pytest.raises(InvalidRequest, match=r"input\['text'\]: 5 is not of type 'string'"):
        router.decide("small", None, {"text": 5})
    assert router.decide("small", None, {"text": "hello"}).route.graph == "echo"


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


RULES = {
    "graphs": [
        {"name": g, "entry": "say", "nodes": {"say": {"kind": "respond", "template": g}}}
        for g in ("vip_desk", "refunds", "front")
    ],
    "tenants": [
        {
            "tenant": "shop",
            "default_route": "front",
            "routes": {
                "vip": {"graph": "vip_desk", "when": "'support:vip' in principal.scopes"},
                "refund": {"graph": "refunds", "when": "'refund' in input.text"},
                "front": {"graph": "front"},
            },
        }
    ],
}


def rules_router() -> Router:
    return Router(Catalog.merge([DefinitionsFile.model_validate(RULES)]))


def test_routes_with_conditions_are_tried_in_order_then_the_default():
    router = rules_router()
    vip = router.decide("shop", None, {"text": "a refund please"}, scopes=frozenset({"support:vip"}))
    assert (vip.target, vip.chosen_by, vip.passed) == ("vip", "when", ())
    refund = router.decide("shop", None, {"text": "a refund please"})
    assert (refund.target, refund.chosen_by, refund.passed) == ("refund", "when", ("vip",))
    front = router.decide("shop", None, {"text": "hello"})
    assert (front.target, front.chosen_by, front.passed) == ("front", "default_route", ("vip", "refund"))


def test_a_target_named_directly_is_served_only_if_its_condition_holds():
    router = rules_router()
    assert router.decide("shop", "vip", {"text": "x"}, scopes=frozenset({"support:vip"})).chosen_by == "target"
    with pytest.raises(NotFound, match="unknown target 'vip'"):  # the same answer as a target that does not exist
        router.decide("shop", "vip", {"text": "x"})


def test_a_condition_reads_the_verified_scopes_never_the_input():
    router = rules_router()
    forged = {"text": "hi", "principal": {"scopes": ["support:vip"]}, "scopes": ["support:vip"]}
    assert router.decide("shop", None, forged).target == "front"


def test_a_route_condition_that_does_not_parse_is_refused_at_load():
    broken = {**RULES, "tenants": [{"tenant": "x", "routes": {"r": {"graph": "front", "when": "import os"}}}]}
    with pytest.raises(ValueError, match="when"):
        Catalog.merge([DefinitionsFile.model_validate(broken)])
