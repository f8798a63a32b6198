"""The verified-token cache: a reconnect skips the signature check, and nothing the verifier would
refuse now passes because it was remembered (an expired token, a removed or rotated key)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from services.auth.errors import InvalidToken
from services.auth.token_cache import VerifiedTokens
from services.auth.tokens import TokenVerifier, VerificationKey
from tests.unit.test_auth_callout import server_request, unpack
from tests.unit.test_auth_jwks import AUDIENCE, ISSUER, jwk, serving, token
from tests.unit.test_auth_tokens import DEV_KEY, dev_token


class Counting(TokenVerifier):
    """A verifier that counts the tokens it was asked to verify."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.verified = 0

    def verify(self, token: str):  # type: ignore[no-untyped-def]
        self.verified += 1
        return super().verify(token)


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))  # a whole second, as a token's exp is

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_a_token_presented_again_is_not_verified_again():
    verifier = Counting(dev_key=DEV_KEY)
    tokens = VerifiedTokens(verifier)
    presented = dev_token()
    first, second = tokens.identity(presented), tokens.identity(presented)
    assert first == second and first.tenant == "acme"
    assert verifier.verified == 1 and (tokens.hits, len(tokens)) == (1, 1)


def test_a_refused_token_is_never_remembered_and_is_refused_every_time():
    verifier = Counting(dev_key=DEV_KEY)
    tokens = VerifiedTokens(verifier)
    claims = {"sub": "alice", "tenant_id": "acme", "exp": int(time.time()) + 60}
    forged = jwt.encode(claims, "not-the-key-of-this-verifier-0123456789")
    for _ in range(3):
        with pytest.raises(InvalidToken, match="signature"):
            tokens.identity(forged)
    assert verifier.verified == 3 and len(tokens) == 0 and tokens.hits == 0


def test_a_remembered_token_is_verified_again_from_its_expiry_on_with_no_leeway():
    clock = Clock()
    verifier = Counting(dev_key=DEV_KEY, leeway_s=30)
    tokens = VerifiedTokens(verifier, clock=clock)
    expiring = dev_token(exp=int(clock.now) + 10)
    tokens.identity(expiring)
    clock.now += 9.5
    assert tokens.remembered(expiring) is not None
    clock.now += 0.5  # its exp: the cache stops answering, the verifier (and its leeway) decides
    assert tokens.remembered(expiring) is None and len(tokens) == 0


def test_an_expired_token_the_verifier_refuses_stays_refused():
    clock = Clock()
    tokens = VerifiedTokens(TokenVerifier(dev_key=DEV_KEY, leeway_s=0), clock=clock)
    tokens.identity(dev_token(exp=int(clock.now) + 1))
    expired = dev_token(exp=int(time.time()) - 5)
    with pytest.raises(InvalidToken, match="expired"):
        tokens.identity(expired)
    assert len(tokens) == 1  # only the valid one


def test_a_token_whose_key_was_removed_is_refused_although_it_was_remembered(rsa_key):
    verifier = Counting(dev_key=None, issuer=ISSUER, audience=AUDIENCE)
    verifier.keys = {"r1": VerificationKey("r1", "RS256", rsa_key.public_key())}
    tokens = VerifiedTokens(verifier)
    signed = token(rsa_key, "r1")
    tokens.identity(signed)
    verifier.keys = {}  # a JWKS refresh without r1 replaces the verifier's keys
    assert tokens.remembered(signed) is None
    with pytest.raises(InvalidToken, match="unknown key id"):
        tokens.identity(signed)


def test_a_token_under_a_rotated_key_of_the_same_kid_is_checked_against_the_new_key(rsa_key):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    verifier = TokenVerifier(dev_key=None, issuer=ISSUER, audience=AUDIENCE)
    verifier.keys = {"r1": VerificationKey("r1", "RS256", rsa_key.public_key())}
    tokens = VerifiedTokens(verifier)
    signed = token(rsa_key, "r1")
    tokens.identity(signed)
    verifier.keys = {"r1": VerificationKey("r1", "RS256", other.public_key())}
    with pytest.raises(InvalidToken, match="signature"):
        tokens.identity(signed)


def test_the_development_key_turned_off_stops_remembered_development_tokens():
    verifier = TokenVerifier(dev_key=DEV_KEY)
    tokens = VerifiedTokens(verifier)
    presented = dev_token()
    tokens.identity(presented)
    verifier.dev_key = None
    with pytest.raises(InvalidToken, match="development tokens are disabled"):
        tokens.identity(presented)


def test_the_cache_is_bounded_and_drops_the_least_recently_used_first():
    verifier = Counting(dev_key=DEV_KEY)
    tokens = VerifiedTokens(verifier, max_entries=3)
    presented = [dev_token(sub=f"user{n}") for n in range(4)]
    for each in presented[:3]:
        tokens.identity(each)
    tokens.identity(presented[0])  # used again: now the most recent
    tokens.identity(presented[3])  # pushes out the least recently used, user1
    assert len(tokens) == 3
    assert tokens.remembered(presented[1]) is None
    assert all(tokens.remembered(each) is not None for each in (presented[0], presented[2], presented[3]))


def test_with_no_room_nothing_is_remembered():
    verifier = Counting(dev_key=DEV_KEY)
    tokens = VerifiedTokens(verifier, max_entries=0)
    presented = dev_token()
    tokens.identity(presented)
    tokens.identity(presented)
    assert verifier.verified == 2 and len(tokens) == 0


def test_the_cache_holds_hashes_of_tokens_never_the_tokens():
    tokens = VerifiedTokens(TokenVerifier(dev_key=DEV_KEY))
    presented = dev_token()
    tokens.identity(presented)
    (key,) = tokens._entries
    assert isinstance(key, bytes) and len(key) == 32 and presented.encode() not in key


# Through the callout handler: a token remembered there is refused once its key leaves the JWKS.


async def test_the_callout_refuses_a_remembered_token_once_its_key_left_the_jwks(rsa_key):
    from services.auth.jwks import JwksKeys
    from tests.unit.test_auth_jwks import callout_handler

    documents = [{"keys": [jwk(rsa_key, "r1", "RS256")]}]
    with serving(documents) as server:
        check = TokenVerifier(dev_key=None, issuer=ISSUER, audience=AUDIENCE)
        jwks = JwksKeys(server.url, check, min_refresh_s=0)
        await jwks.refresh()
        service, authorize = callout_handler(check, jwks)
        signed = token(rsa_key, "r1")
        request = SimpleNamespace(data=server_request(token=signed), reply="_INBOX.r")
        await authorize(request)
        documents[0] = {"keys": []}  # the identity provider withdrew r1
        await jwks.refresh()
        await authorize(request)
        await jwks.aclose()
    first, second = (unpack(data.decode())[1]["nats"] for _, data in service.nc.messages)
    assert "jwt" in first
    assert second["error"].startswith("unknown key id")
