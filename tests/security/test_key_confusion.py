"""Key confusion at the broker: with an identity provider's RS256 key configured, a token signed
HS256 with that (public) key as the secret must be refused, while a genuine token connects."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import jwt
import nats
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.services import running_services


async def test_hs256_signed_with_the_idps_public_key_is_refused_at_connect(secured, tmp_path, monkeypatch):
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        idp_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    keys = tmp_path / "idp-keys.json"
    keys.write_text(json.dumps([{"kid": "idp-1", "alg": "RS256", "public_key_pem": public_pem}]))
    monkeypatch.setenv("CORRAL_AUTH_KEYS_FILE", str(keys))
    monkeypatch.setenv("CORRAL_AUTH_ISSUER", "https://idp")
    monkeypatch.setenv("CORRAL_AUTH_AUDIENCE", "corral")
    now = int(time.time())
    body = {"iss": "https://idp", "aud": "corral", "sub": "mallory", "tenant_id": "acme", "iat": now, "exp": now + 300}
    # PyJWT refuses to HMAC with a PEM, so the attacker builds the token by hand.
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "idp-1"}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(body).encode())
    signature = hmac.new(public_pem.encode(), header + b"." + payload, hashlib.sha256).digest()
    forged = (header + b"." + payload + b"." + jwt.utils.base64url_encode(signature)).decode()
    genuine = jwt.encode(body, idp_key, algorithm="RS256", headers={"kid": "idp-1"})
    async with running_services(secured.url, secured.state_dir, ("auth",)):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(secured.url, token=forged, allow_reconnect=False, connect_timeout=3)
        nc = await nats.connect(
            secured.url, token=genuine, allow_reconnect=False, connect_timeout=3, inbox_prefix=b"_INBOX.acme"
        )
        assert nc.is_connected  # the same claims, properly signed, are accepted
        await nc.close()
