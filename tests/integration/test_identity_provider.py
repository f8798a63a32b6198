"""A real identity-provider flow through the broker: keys from a JWKS URL (token renewal on
expiry is in test_token_refresh.py)."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from corral.client import CorralClient
from tests.support.http import Reply, http_server
from tests.support.services import running_services

ISSUER, AUDIENCE = "https://idp.example", "corral"
ALL = ("auth", "router", "graph", "tools")


@pytest.fixture(scope="module")
def idp_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def test_a_token_from_a_jwks_identity_provider_connects_and_is_served(secured, idp_key, monkeypatch):
    public = jwt.algorithms.RSAAlgorithm.to_jwk(idp_key.public_key(), as_dict=True)
    document = {"keys": [{**public, "kid": "idp-2026", "alg": "RS256"}]}
    with http_server(lambda request: Reply(body=document)) as idp:
        monkeypatch.setenv("CORRAL_AUTH_JWKS_URL", idp.url + "/.well-known/jwks.json")
        monkeypatch.setenv("CORRAL_AUTH_ISSUER", ISSUER)
        monkeypatch.setenv("CORRAL_AUTH_AUDIENCE", AUDIENCE)
        monkeypatch.setenv("CORRAL_AUTH_TENANT_CLAIM", "org.id")
        async with running_services(secured.url, secured.state_dir, ALL):
            now = int(time.time())
            claims = {
                "iss": ISSUER,
                "aud": AUDIENCE,
                "sub": "alice@globex",
                "org": {"id": "globex"},
                "iat": now,
                "exp": now + 300,
            }
            token = jwt.encode(claims, idp_key, algorithm="RS256", headers={"kid": "idp-2026"})
            client = await CorralClient.connect(secured.url, tenant="globex", token=token)
            try:
                result = await client.request("where is my order?")
            finally:
                await client.close()
    assert result.output.startswith("Order G-")
