"""Identity at the broker: every bad token is refused at connect, and the auth service keeps
serving good ones afterwards."""

from __future__ import annotations

import time

import jwt
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from contracts import subjects
from contracts.envelope import Envelope, Kind, RouterRequest
from contracts.errors import TenantMismatch
from contracts.replies import decode_reply
from services.auth.tokens import DEV_AUDIENCE, DEV_ISSUER, mint_dev_token
from tests.security.conftest import still_serving

pytestmark = pytest.mark.usefixtures("system")


def claims(**changes):
    now = int(time.time())
    base = {"iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": "mallory", "tenant_id": "acme", "iat": now, "exp": now + 300}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def forged_tokens(dev_key):
    now = int(time.time())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "wrong signature": jwt.encode(claims(), "not-the-dev-key-0123456789abcdefghij", algorithm="HS256"),
        "expired": jwt.encode(claims(exp=now - 600), dev_key, algorithm="HS256"),
        "not yet valid": jwt.encode(claims(nbf=now + 600), dev_key, algorithm="HS256"),
        "alg none": jwt.encode(claims(), None, algorithm="none"),
        "rs256 signed by a stranger": jwt.encode(claims(), rsa_key, algorithm="RS256"),
        "wrong issuer": jwt.encode(claims(iss="https://evil"), dev_key, algorithm="HS256"),
        "wrong audience": jwt.encode(claims(aud="someone-else"), dev_key, algorithm="HS256"),
        "missing tenant claim": jwt.encode(claims(tenant_id=None), dev_key, algorithm="HS256"),
        "tenant *": jwt.encode(claims(tenant_id="*"), dev_key, algorithm="HS256"),
        "tenant >": jwt.encode(claims(tenant_id=">"), dev_key, algorithm="HS256"),
        "tenant a.b": jwt.encode(claims(tenant_id="a.b"), dev_key, algorithm="HS256"),
        "tenant ACME": jwt.encode(claims(tenant_id="ACME"), dev_key, algorithm="HS256"),
        "tenant empty": jwt.encode(claims(tenant_id=""), dev_key, algorithm="HS256"),
        "tenant 200 chars": jwt.encode(claims(tenant_id="a" * 200), dev_key, algorithm="HS256"),
        "garbage": "definitely-not-a-jwt",
        "empty": "",
    }


async def test_every_forged_or_broken_token_is_refused_at_connect(system):
    broker, _ = system
    for name, token in forged_tokens(broker.secrets.dev_key).items():
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            nc = await nats.connect(
                broker.url, token=token, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3
            )
            await nc.close()
            pytest.fail(f"connected with {name}")
    await still_serving(broker)


async def test_a_valid_token_for_one_tenant_never_grants_another(system):
    broker, _ = system
    nc = await nats.connect(
        broker.url,
        token=mint_dev_token("globex", key=broker.secrets.dev_key),
        inbox_prefix=b"_INBOX.globex",
        allow_reconnect=False,
    )
    try:
        # Asking for acme's data with globex's token: the router request goes to globex's subject
        # (the only one allowed), so the tenant is globex whatever the payload claims.
        forged = Envelope[RouterRequest](kind=Kind.REQUEST, tenant_id="acme", payload=RouterRequest())
        reply = await nc.request(subjects.router_request("globex", "dev"), forged.model_dump_json().encode(), timeout=5)
        with pytest.raises(TenantMismatch):
            decode_reply(reply.data)
    finally:
        await nc.close()
    await still_serving(broker, "globex")
