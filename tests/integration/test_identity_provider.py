"""Real identity-provider flows through the broker: keys from a JWKS URL, and tokens that expire
while a client is connected."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from contracts.errors import Internal
from services.auth.tokens import mint_dev_token
from services.client import CorralClient
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


async def test_a_client_with_a_token_provider_outlives_its_token(secured):
    key = secured.secrets.dev_key
    issued: list[int] = []

    def fresh_token() -> str:
        issued.append(1)
        return mint_dev_token("acme", key=key, ttl_s=2 if len(issued) == 1 else 300)

    async with running_services(secured.url, secured.state_dir, ALL):
        client = await CorralClient.connect(secured.url, tenant="acme", token=fresh_token)
        try:
            # The server closes the connection when the first token expires; the client opens a
            # new one with a fresh token from the provider.
            await asyncio.wait_for(client.renewed.wait(), timeout=15)
            result = await client.request("where is my order?")
        finally:
            await client.close()
    assert result.output.startswith("Order A-")
    assert len(issued) >= 2


async def test_a_client_with_a_fixed_token_is_cut_off_when_it_expires(secured):
    disconnected = asyncio.Event()

    async def on_disconnected():
        disconnected.set()

    async with running_services(secured.url, secured.state_dir, ALL):
        client = await CorralClient.connect(
            secured.url,
            tenant="acme",
            token=mint_dev_token("acme", key=secured.secrets.dev_key, ttl_s=2),
            disconnected_cb=on_disconnected,
        )
        try:
            await asyncio.wait_for(disconnected.wait(), timeout=15)
            with pytest.raises(Internal, match="not connected"):
                await client.request("where is my order?", timeout=2)
        finally:
            await client.close()
