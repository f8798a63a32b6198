"""The auth-callout protocol: requests verified, responses and user JWTs signed as NATS expects."""

from __future__ import annotations

import base64
import json
import os
import time

import nacl.signing
import nkeys
import pytest

from contracts.permissions import tenant_permissions
from services.auth.callout import MAX_USER_TTL_S, CalloutSigner, decode_request, encode_jwt
from services.auth.errors import InvalidCalloutRequest
from services.auth.tokens import Identity


def keypair(prefix):
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


SERVER = keypair(nkeys.PREFIX_BYTE_SERVER)
ISSUER = keypair(nkeys.PREFIX_BYTE_ACCOUNT)
USER_NKEY = keypair(nkeys.PREFIX_BYTE_USER).public_key.decode()


def server_request(token="the-token", signer=SERVER, aud="nats-authorization-request", kind="authorization_request"):
    claims = {
        "iss": signer.public_key.decode(),
        "aud": aud,
        "sub": USER_NKEY,
        "nats": {
            "type": kind,
            "version": 2,
            "user_nkey": USER_NKEY,
            "server_id": {"name": "n1", "id": "NSERVERID", "version": "2.15.1"},
            "client_info": {"name": "corral-client-acme"},
            "connect_opts": {"auth_token": token},
        },
    }
    return encode_jwt(claims, signer).encode()


def unpack(token: str):
    header, claims, signature = token.split(".")

    def decode(part):
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    return json.loads(decode(header)), json.loads(decode(claims)), decode(signature), f"{header}.{claims}".encode()


def verify_with(public_key: str, signed: bytes, signature: bytes) -> None:
    raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    nacl.signing.VerifyKey(raw[1:33]).verify(signed, signature)


def test_a_server_request_yields_the_user_key_server_and_token():
    request = decode_request(server_request())
    assert (request.user_nkey, request.server_id, request.token) == (USER_NKEY, "NSERVERID", "the-token")


def test_a_request_signed_by_a_non_server_key_is_refused():
    with pytest.raises(InvalidCalloutRequest, match="server key"):
        decode_request(server_request(signer=ISSUER))


def test_a_tampered_request_is_refused():
    header, claims, signature = server_request().decode().split(".")
    altered = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    altered["nats"]["connect_opts"]["auth_token"] = "swapped"
    forged = base64.urlsafe_b64encode(json.dumps(altered).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidCalloutRequest, match="signature"):
        decode_request(f"{header}.{forged}.{signature}".encode())


@pytest.mark.parametrize("body", [b"", b"garbage", b"a.b.c", b"\xff\xfe.x.y"])
def test_malformed_requests_are_refused(body):
    with pytest.raises(InvalidCalloutRequest):
        decode_request(body)


def test_a_request_for_another_audience_is_refused():
    with pytest.raises(InvalidCalloutRequest, match="not an authorization request"):
        decode_request(server_request(aud="someone-else"))


def test_a_request_of_the_wrong_type_is_refused():
    with pytest.raises(InvalidCalloutRequest, match="not an authorization request"):
        decode_request(server_request(kind="something_else"))


def test_the_response_grants_exactly_the_tenants_permissions_until_the_token_expires():
    signer = CalloutSigner(ISSUER.seed.decode())
    request = decode_request(server_request())
    expires = int(time.time()) + 120
    response = signer.response(request, identity=Identity(tenant="acme", subject="alice", expires_at=expires))
    header, claims, signature, signed = unpack(response.decode())
    assert header == {"typ": "JWT", "alg": "ed25519-nkey"}
    verify_with(ISSUER.public_key.decode(), signed, signature)
    assert claims["sub"] == USER_NKEY and claims["aud"] == "NSERVERID" and claims["iss"] == signer.issuer
    assert claims["nats"]["type"] == "authorization_response" and claims["nats"]["version"] == 2
    _, user, user_signature, user_signed = unpack(claims["nats"]["jwt"])
    verify_with(ISSUER.public_key.decode(), user_signed, user_signature)
    permissions = tenant_permissions("acme", "alice")
    assert user["nats"]["pub"] == {"allow": list(permissions.publish)}
    assert user["nats"]["sub"] == {"allow": list(permissions.subscribe)}
    assert (user["sub"], user["aud"], user["exp"], user["nats"]["version"]) == (USER_NKEY, "APP", expires, 2)
    assert user["name"] == "acme/alice"


def test_a_denial_carries_the_reason_and_no_user():
    signer = CalloutSigner(ISSUER.seed.decode())
    response = signer.response(decode_request(server_request()), error="token expired")
    _, claims, _, _ = unpack(response.decode())
    assert claims["nats"]["error"] == "token expired"
    assert "jwt" not in claims["nats"]


def test_a_user_never_outlives_the_maximum_lifetime_whatever_its_token_says():
    signer = CalloutSigner(ISSUER.seed.decode())
    far = int(time.time()) + 365 * 24 * 3600
    response = signer.response(decode_request(server_request()), identity=Identity("acme", "alice", far))
    _, claims, _, _ = unpack(response.decode())
    _, user, _, _ = unpack(claims["nats"]["jwt"])
    assert user["exp"] <= user["iat"] + MAX_USER_TTL_S


def test_every_response_carries_a_jti_and_an_issue_time():
    signer = CalloutSigner(ISSUER.seed.decode())
    _, claims, _, _ = unpack(signer.response(decode_request(server_request()), error="no").decode())
    assert claims["jti"] and abs(claims["iat"] - time.time()) < 60
