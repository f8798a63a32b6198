"""Validating tenants' tokens: algorithm pinned per key, claims required, tenant ids checked."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from services.auth.errors import InvalidToken
from services.auth.tokens import DEV_AUDIENCE, DEV_ISSUER, TokenVerifier, load_keys, mint_dev_token

DEV_KEY = "dev-key-for-tests-only-0123456789abcdef"


def dev_claims(**changes):
    now = int(time.time())
    claims = {"iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": "alice", "tenant_id": "acme", "iat": now, "exp": now + 60}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def dev_token(**changes):
    return jwt.encode(dev_claims(**changes), DEV_KEY, algorithm="HS256")


@pytest.fixture
def verifier():
    return TokenVerifier(dev_key=DEV_KEY)


def pem(private_key):
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_a_minted_development_token_yields_its_tenant_and_subject(verifier):
    identity = verifier.verify(mint_dev_token("globex", key=DEV_KEY, sub="bob"))
    assert (identity.tenant, identity.subject) == ("globex", "bob")
    assert identity.expires_at > time.time()


# Minted when the test runs, never at collection: a token with a short expiry made at collection
# time expires before the test runs on a busy machine (and then fails for the wrong reason).
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: dev_token(exp=int(time.time()) - 3600), "expired"),
        (lambda: dev_token(nbf=int(time.time()) + 3600), "not yet valid"),
        (lambda: jwt.encode(dev_claims(), "another-key-entirely-0123456789abcdef", algorithm="HS256"), "bad signature"),
        (lambda: dev_token(iss="someone-else"), "(?i)issuer"),
        (lambda: dev_token(aud="another-audience"), "(?i)audience"),
        (lambda: dev_token(exp=None), "exp"),
        (lambda: dev_token(tenant_id=None), "no 'tenant_id' claim"),
        (lambda: "not.a.jwt", "malformed"),
        (lambda: "", "no token"),
    ],
    ids=[
        "expired",
        "not-yet-valid",
        "bad-signature",
        "issuer",
        "audience",
        "no-exp",
        "no-tenant",
        "malformed",
        "empty",
    ],
)
def test_bad_tokens_are_refused_with_a_reason(verifier, make, reason):
    with pytest.raises(InvalidToken, match=reason):
        verifier.verify(make())


@pytest.mark.parametrize("tenant", ["*", ">", "a.b", "ACME", "", "x" * 200, "t.>", "acme\n"])
def test_a_signed_token_with_an_unsafe_tenant_claim_is_refused(verifier, tenant):
    with pytest.raises(InvalidToken, match="not a valid tenant id"):
        verifier.verify(dev_token(tenant_id=tenant))


def test_alg_none_is_refused(verifier):
    unsigned = jwt.encode(dev_claims(), None, algorithm="none")
    with pytest.raises(InvalidToken):
        verifier.verify(unsigned)


def test_hs256_signed_with_the_rsa_public_key_is_refused(rsa_key, tmp_path):
    """Key confusion: an attacker signs HS256 with the (public) RS256 key as the HMAC secret."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"kid": "idp-1", "alg": "RS256", "public_key_pem": pem(rsa_key)}]))
    verifier = TokenVerifier(dev_key=None, keys=load_keys(keys), issuer="https://idp", audience="corral")
    claims = dev_claims(iss="https://idp", aud="corral")
    import hashlib
    import hmac

    # PyJWT itself refuses to HMAC-sign with a PEM, so forge the token by hand as an attacker would.
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "idp-1"}).encode())
    body = jwt.utils.base64url_encode(json.dumps(claims).encode())
    signature = hmac.new(pem(rsa_key).encode(), header + b"." + body, hashlib.sha256).digest()
    forged = (header + b"." + body + b"." + jwt.utils.base64url_encode(signature)).decode()
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        verifier.verify(forged)


@pytest.mark.parametrize(
    ("algorithm", "make_key"),
    [
        ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
        ("EdDSA", ed25519.Ed25519PrivateKey.generate),
    ],
)
def test_identity_provider_tokens_are_verified_with_the_key_their_kid_names(tmp_path, algorithm, make_key):
    key = make_key()
    keys = tmp_path / "keys.yaml"
    keys.write_text(json.dumps([{"kid": "k1", "alg": algorithm, "public_key_pem": pem(key)}]))
    verifier = TokenVerifier(dev_key=DEV_KEY, keys=load_keys(keys), issuer="https://idp", audience="corral")
    token = jwt.encode(dev_claims(iss="https://idp", aud="corral"), key, algorithm=algorithm, headers={"kid": "k1"})
    assert verifier.verify(token).tenant == "acme"
    other = make_key()
    wrong = jwt.encode(dev_claims(iss="https://idp", aud="corral"), other, algorithm=algorithm, headers={"kid": "k1"})
    with pytest.raises(InvalidToken, match="bad signature"):
        verifier.verify(wrong)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"iss": "https://impostor"}, "(?i)issuer"),
        ({"aud": "another-service"}, "(?i)audience"),
        ({"aud": None}, "aud"),
        ({"iss": None}, "iss"),
    ],
)
def test_the_configured_issuer_and_audience_are_required_of_provider_tokens(rsa_key, tmp_path, changes, reason):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"kid": "idp-1", "alg": "RS256", "public_key_pem": pem(rsa_key)}]))
    verifier = TokenVerifier(dev_key=None, keys=load_keys(keys), issuer="https://idp", audience="corral")
    claims = dev_claims(**{"iss": "https://idp", "aud": "corral", **changes})
    token = jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "idp-1"})
    with pytest.raises(InvalidToken, match=reason):
        verifier.verify(token)


@pytest.mark.parametrize(("leeway_s", "accepted"), [(30.0, True), (0.0, False)])
def test_expiry_is_judged_with_the_configured_leeway(leeway_s, accepted):
    """A token that expired 10 s ago passes with the default 30 s leeway (clock skew), not with none."""
    verifier = TokenVerifier(dev_key=DEV_KEY, leeway_s=leeway_s)
    token = dev_token(exp=int(time.time()) - 10)
    if accepted:
        assert verifier.verify(token).tenant == "acme"
    else:
        with pytest.raises(InvalidToken, match="expired"):
            verifier.verify(token)


def test_an_unknown_kid_is_refused(verifier, rsa_key):
    token = jwt.encode(dev_claims(), rsa_key, algorithm="RS256", headers={"kid": "nope"})
    with pytest.raises(InvalidToken, match="unknown key id"):
        verifier.verify(token)


def test_development_tokens_can_be_switched_off():
    with pytest.raises(InvalidToken, match="development tokens are disabled"):
        TokenVerifier(dev_key=None).verify(dev_token())


@pytest.mark.parametrize(
    ("claim", "claims"),
    [("custom:tenant_id", {"custom:tenant_id": "acme"}), ("org.id", {"org": {"id": "acme"}})],
)
def test_the_tenant_claim_path_is_configurable(claim, claims):
    verifier = TokenVerifier(dev_key=DEV_KEY, tenant_claim=claim)
    assert verifier.verify(dev_token(tenant_id=None, **claims)).tenant == "acme"


def test_a_required_scope_must_be_present():
    verifier = TokenVerifier(dev_key=DEV_KEY, required_scope="corral:use")
    assert verifier.verify(dev_token(scope="openid corral:use")).tenant == "acme"
    with pytest.raises(InvalidToken, match="required scope"):
        verifier.verify(dev_token(scope="openid"))


def test_symmetric_keys_are_not_accepted_from_configuration(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"kid": "k", "alg": "HS256", "public_key_pem": "secret"}]))
    with pytest.raises(Exception, match="not an allowed public-key"):
        load_keys(keys)


def test_minting_refuses_an_invalid_tenant():
    with pytest.raises(Exception, match="invalid tenant id"):
        mint_dev_token("*", key=DEV_KEY)
