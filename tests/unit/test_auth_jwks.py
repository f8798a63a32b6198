"""Identity-provider keys from a JWKS URL, against a real local JWKS server."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.auth.errors import InvalidToken
from services.auth.jwks import JwksKeys
from services.auth.tokens import TokenVerifier
from services.runtime.nats_server import free_port
from tests.support.http import Reply, http_server

ISSUER, AUDIENCE = "https://idp.example", "corral"


def jwk(private_key, kid, alg):
    algorithm = jwt.algorithms.RSAAlgorithm if alg.startswith("RS") else jwt.algorithms.ECAlgorithm
    entry = algorithm.to_jwk(private_key.public_key(), as_dict=True)
    return {**entry, "kid": kid, **({"alg": alg} if alg else {})}


def token(private_key, kid, alg="RS256", **claims):
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "tenant_id": "acme", "iat": now, "exp": now + 60, **claims}
    return jwt.encode(body, private_key, algorithm=alg, headers={"kid": kid})


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def verifier():
    return TokenVerifier(dev_key=None, issuer=ISSUER, audience=AUDIENCE)


def serving(documents):
    """A JWKS server answering with the current document of ``documents`` (a one-item list)."""
    return http_server(lambda request: Reply(body=documents[0]))


async def test_tokens_signed_by_jwks_keys_verify(rsa_key, ec_key):
    documents = [{"keys": [jwk(rsa_key, "r1", "RS256"), jwk(ec_key, "e1", "ES256")]}]
    with serving(documents) as server:
        check = verifier()
        keys = JwksKeys(server.url + "/jwks", check)
        await keys.refresh()
        assert check.verify(token(rsa_key, "r1")).tenant == "acme"
        assert check.verify(token(ec_key, "e1", alg="ES256")).tenant == "acme"
        await keys.aclose()


async def test_a_rotated_key_is_picked_up_on_its_first_token(rsa_key):
    documents = [{"keys": [jwk(rsa_key, "old", "RS256")]}]
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with serving(documents) as server:
        check = verifier()
        keys = JwksKeys(server.url, check, min_refresh_s=0)
        await keys.refresh()
        documents[0] = {"keys": [jwk(rsa_key, "old", "RS256"), jwk(new_key, "new", "RS256")]}
        fresh = token(new_key, "new")
        await keys.refresh_if_unknown("new")
        assert check.verify(fresh).tenant == "acme"
        assert keys.fetches == 2
        await keys.aclose()


async def test_unknown_kids_refresh_at_most_once_per_window(rsa_key):
    with serving([{"keys": [jwk(rsa_key, "r1", "RS256")]}]) as server:
        keys = JwksKeys(server.url, verifier(), min_refresh_s=3600)
        await keys.refresh()
        for kid in ("random-1", "random-2", "random-3"):
            await keys.refresh_if_unknown(kid)
        assert keys.fetches == 1 and len(server.received) == 1
        await keys.aclose()


@pytest.mark.parametrize(
    ("entry", "why"),
    [({"alg": None}, "no alg"), ({"alg": "HS256", "kty": "oct", "k": "c2VjcmV0"}, "symmetric")],
)
async def test_keys_without_a_pinned_asymmetric_alg_are_ignored(rsa_key, entry, why):
    base = jwk(rsa_key, "k", "RS256")
    bad = {k: v for k, v in {**base, **entry}.items() if v is not None}
    with serving([{"keys": [bad]}]) as server:
        check = verifier()
        keys = JwksKeys(server.url, check)
        await keys.refresh()
        assert check.keys == {}, why
        with pytest.raises(InvalidToken, match="unknown key id"):
            check.verify(token(rsa_key, "k"))
        await keys.aclose()


async def test_an_unreachable_jwks_leaves_tokens_refused_not_hanging(rsa_key):
    check = verifier()
    keys = JwksKeys(f"http://127.0.0.1:{free_port()}/jwks", check, timeout_s=2)
    await keys.refresh_if_unknown("r1")
    with pytest.raises(InvalidToken, match="unknown key id"):
        check.verify(token(rsa_key, "r1"))
    await keys.aclose()


async def test_a_garbled_jwks_document_is_survived(rsa_key):
    with http_server(lambda request: Reply(body="not json", content_type="text/plain")) as server:
        check = verifier()
        keys = JwksKeys(server.url, check)
        await keys.refresh()
        assert check.keys == {}
        await keys.aclose()


def test_a_token_issued_in_the_future_is_refused():
    now = int(time.time())
    claims = {
        "iss": "corral-dev",
        "aud": "corral",
        "sub": "a",
        "tenant_id": "acme",
        "iat": now + 3600,
        "exp": now + 7200,
    }
    with pytest.raises(InvalidToken, match="not yet valid"):
        TokenVerifier(dev_key="k" * 32).verify(jwt.encode(claims, "k" * 32, algorithm="HS256"))
