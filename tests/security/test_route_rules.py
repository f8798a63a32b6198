"""Route rules (``when``) read the verified principal's scopes from the request's subject, which
the broker lets a connection use only with exactly its token's scopes: a scope cannot be claimed
in the input or forged in the subject. Over a real broker configured as in production."""

from __future__ import annotations

import pytest
import yaml
from nats.errors import TimeoutError as NatsTimeout

from contracts import subjects
from contracts.envelope import Kind, RouterRequest, new_envelope_json
from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from tests.support.services import running_services

RULES = {
    "graphs": [
        {"name": g, "entry": "say", "nodes": {"say": {"kind": "respond", "template": g}}} for g in ("vip_desk", "front")
    ],
    "tenants": [
        {
            "tenant": "shop",
            "default_route": "front",
            "routes": {
                "vip": {"graph": "vip_desk", "when": "'support:vip' in principal.scopes"},
                "front": {"graph": "front"},
            },
        }
    ],
}


@pytest.fixture
async def broker(secured, tmp_path):
    folder = tmp_path / "definitions"
    folder.mkdir()
    (folder / "rules.yaml").write_text(yaml.safe_dump(RULES))
    async with running_services(secured.url, secured.state_dir, ("auth", "router", "graph"), folder):
        yield secured


async def client_for(broker, sub, scopes=()):
    token = mint_dev_token("shop", key=broker.secrets.dev_key, sub=sub, scopes=tuple(scopes))
    return await CorralClient.connect(broker.url, tenant="shop", token=token)


async def test_a_rule_chooses_by_the_tokens_scopes_and_says_why_in_the_first_event(broker):
    vip = await client_for(broker, "vera", scopes=["support:vip", "orders:read"])
    plain = await client_for(broker, "paul")
    try:
        chosen = await vip.request("hello")
        default = await plain.request("hello", input={"principal": {"scopes": ["support:vip"]}})
    finally:
        await vip.close()
        await plain.close()
    assert chosen.output == "vip_desk" and default.output == "front"
    accepted = next(e for e in chosen.events if e.type.value == "accepted")
    assert accepted.data == {"target": "vip", "pattern": "graph", "chosen_by": "when", "passed": []}
    fallback = next(e for e in default.events if e.type.value == "accepted")
    assert fallback.data["chosen_by"] == "default_route" and fallback.data["passed"] == ["vip"]


async def test_scopes_the_token_does_not_hold_cannot_be_put_in_the_subject(broker):
    plain = await client_for(broker, "paul")
    try:
        forged = subjects.router_request("shop", "paul", frozenset({"support:vip"}))
        body = new_envelope_json(Kind.REQUEST, "shop", RouterRequest(input={"text": "hello"}), run_id="r1")
        with pytest.raises(NatsTimeout):  # the broker refused the publish: nothing answers
            await plain.nc.request(forged, body, timeout=1.0)
        errors = [str(error).lower() for error in plain.errors]
    finally:
        await plain.close()
    assert any("permissions violation" in error and "router.request" in error for error in errors), errors
