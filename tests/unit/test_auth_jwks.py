"""Identity-provider keys from a JWKS URL, against a real local JWKS server."""

from __future__ import annotations

import json
import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from corral.nats_server import free_port
from services.auth.errors import InvalidToken
from services.auth.jwks import JwksKeys
from services.auth.tokens import TokenVerifier
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


def test_a_kid_that_is_not_a_string_is_a_malformed_token_not_a_crash(rsa_key):
    # PyJWT will not encode such a header: forge it by hand, as an attacker would.
    header = jwt.utils.base64url_encode(json.dumps({"alg": "RS256", "kid": ["a", "list"]}).encode())
    body = jwt.utils.base64url_encode(json.dumps({"sub": "a"}).encode())
    forged = (header + b"." + body + b".c2ln").decode()
    with pytest.raises(InvalidToken, match="malformed"):
        verifier().verify(forged)


def test_a_token_issued_in_the_future_says_so():
    now = int(time.time())
    claims = {
        "iss": "corral-dev",
        "aud": "corral",
        "sub": "a",
        "tenant_id": "acme",
        "iat": now + 3600,
        "exp": now + 7200,
    }
    with pytest.raises(InvalidToken, match="issued in the future"):
        TokenVerifier(dev_key="k" * 32).verify(jwt.encode(claims, "k" * 32, algorithm="HS256"))


async def test_encryption_keys_and_keys_that_do_not_fit_their_alg_are_ignored(rsa_key, ec_key):
    document = {
        "keys": [
            {**jwk(rsa_key, "enc", "RS256"), "use": "enc"},
            {**jwk(rsa_key, "misfit", "RS256"), "alg": "ES256"},  # an RSA key claiming ES256
            {**jwk(ec_key, "good", "ES256"), "use": "sig"},
        ]
    }
    with serving([document]) as server:
        check = verifier()
        keys = JwksKeys(server.url, check)
        await keys.refresh()
        assert set(check.keys) == {"good"} and check.keys["good"].algorithm == "ES256"
        await keys.aclose()


async def test_a_failed_refresh_keeps_the_keys_already_known(rsa_key):
    documents = [{"keys": [jwk(rsa_key, "r1", "RS256")]}]
    with serving(documents) as server:
        check = verifier()
        keys = JwksKeys(server.url, check, min_refresh_s=0)
        await keys.refresh()
        documents[0] = {"not": "a jwks"}
        await keys.refresh_if_unknown("other")
        assert keys.fetches == 2 and set(check.keys) == {"r1"}
        assert check.verify(token(rsa_key, "r1")).tenant == "acme"
        await keys.aclose()


async def test_keys_from_the_keys_file_are_kept_and_win_over_the_jwks(rsa_key, ec_key):
    from services.auth.tokens import VerificationKey

    check = verifier()
    check.keys = {"file": VerificationKey("file", "ES256", ec_key.public_key())}
    with serving([{"keys": [jwk(rsa_key, "r1", "RS256"), jwk(rsa_key, "file", "RS256")]}]) as server:
        keys = JwksKeys(server.url, check)
        await keys.refresh()
        assert set(check.keys) == {"r1", "file"} and check.keys["file"].algorithm == "ES256"
        assert check.verify(token(ec_key, "file", alg="ES256")).tenant == "acme"
        await keys.aclose()


async def test_a_stuck_jwks_server_is_given_up_on_after_the_timeout(rsa_key):
    stuck = threading.Event()
    with http_server(lambda request: Reply(body={"keys": []}, wait=stuck)) as server:
        check = verifier()
        keys = JwksKeys(server.url, check, timeout_s=0.5)
        started = time.monotonic()
        await keys.refresh_if_unknown("r1")
        assert time.monotonic() - started < 3
        with pytest.raises(InvalidToken, match="unknown key id"):
            check.verify(token(rsa_key, "r1"))
        stuck.set()
        await keys.aclose()


# The auth handler: it refreshes the JWKS for an unknown kid before verifying, and answers every request.


class Published:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.messages.append((subject, data))


def callout_handler(check, jwks):
    from services.auth.callout import CalloutSigner
    from services.auth.handlers import register
    from services.auth.manifest import MANIFEST
    from services.runtime.service import Service
    from services.runtime.settings import Settings
    from tests.unit.test_auth_callout import ISSUER

    service = Service(MANIFEST, Settings(log_level="warning"))
    register(service, check, CalloutSigner(ISSUER.seed.decode()), jwks)
    service.nc = Published()
    return service, service.handlers["callout"]


def response_of(service):
    from tests.unit.test_auth_callout import unpack

    ((_subject, data),) = service.nc.messages
    return unpack(data.decode())[1]["nats"]


@pytest.mark.parametrize("reachable", [True, False], ids=["jwks-up", "jwks-down"])
async def test_the_handler_fetches_a_new_kid_before_verifying(rsa_key, reachable):
    from types import SimpleNamespace

    from tests.unit.test_auth_callout import server_request

    with serving([{"keys": [jwk(rsa_key, "r1", "RS256")]}]) as server:
        url = server.url if reachable else f"http://127.0.0.1:{free_port()}/jwks"
        check = verifier()
        jwks = JwksKeys(url, check, timeout_s=2)
        service, authorize = callout_handler(check, jwks)
        await authorize(SimpleNamespace(data=server_request(token=token(rsa_key, "r1")), reply="_INBOX.r"))
        response = response_of(service)
        await jwks.aclose()
    if reachable:
        assert "jwt" in response and "error" not in response
    else:
        assert response["error"].startswith("unknown key id")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CORRAL_AUTH_JWKS_URL": "https://idp.example/jwks"}, "CORRAL_AUTH_ISSUER and CORRAL_AUTH_AUDIENCE"),
        ({"CORRAL_AUTH_JWKS_URL": "https://idp.example/jwks", "CORRAL_AUTH_ISSUER": ISSUER}, "AUDIENCE"),
        (
            {
                "CORRAL_AUTH_JWKS_URL": "file:///etc/jwks",
                "CORRAL_AUTH_ISSUER": ISSUER,
                "CORRAL_AUTH_AUDIENCE": AUDIENCE,
            },
            "https://",
        ),
    ],
)
def test_the_auth_service_refuses_to_start_with_provider_keys_but_no_issuer_or_audience(monkeypatch, env, message):
    from services.auth.__main__ import build
    from services.runtime.settings import Settings
    from tests.unit.test_auth_callout import ISSUER as ISSUER_KEY

    monkeypatch.setenv("CORRAL_AUTH_ISSUER_SEED", ISSUER_KEY.seed.decode())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=message):
        build(Settings(log_level="warning"))
