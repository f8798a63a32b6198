"""The NATS auth-callout protocol: verify the server's request, sign the response.

Shapes as verified on nats-server 2.15 (see NATS-NOTES.md): JWTs with the header
``{"typ":"JWT","alg":"ed25519-nkey"}``, base64url (no padding) header and claims, and an ed25519
signature over ``header.claims``; ``nats.version`` is 2 in every JWT.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys

from contracts.definitions import ConnectionLimits
from contracts.permissions import tenant_permissions
from services.auth.errors import InvalidCalloutRequest
from services.auth.tokens import Identity
from services.runtime.manifest import APP_ACCOUNT

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
REQUEST_AUDIENCE = "nats-authorization-request"
# Upper bound of a user's lifetime, whatever its token says; the server disconnects it then.
MAX_USER_TTL_S = 24 * 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class CalloutRequest:
    user_nkey: str
    server_id: str
    token: str
    client_name: str
    # The connection's client id on that server: with ``server_id`` it names the connection in
    # the broker's CONNECT/DISCONNECT events (services/auth/connections.py).
    client_id: int = 0
    # The server's name, which it keeps when it restarts (its id changes): a cluster node.
    server_name: str = ""


@functools.lru_cache(maxsize=64)  # a broker's key is the same in every request: decoded once
def _public_key(encoded: str, prefix: int) -> nacl.signing.VerifyKey:
    raw = base64.b32decode(encoded + "=" * (-len(encoded) % 8))
    if len(raw) != 35 or raw[0] != prefix:
        raise InvalidCalloutRequest("request not signed by a server key")
    if nkeys.crc16(bytearray(raw[:-2])) != int.from_bytes(raw[-2:], "little"):
        raise InvalidCalloutRequest("server key checksum mismatch")
    return nacl.signing.VerifyKey(raw[1:33])


def decode_request(data: bytes) -> CalloutRequest:
    """Verify the server's authorization-request JWT and take what the response needs."""
    try:
        header_part, claims_part, signature_part = data.decode().split(".")
        header = json.loads(_unb64(header_part))
        claims = json.loads(_unb64(claims_part))
        if header.get("alg") != HEADER["alg"]:
            raise InvalidCalloutRequest("unexpected request algorithm")
        key = _public_key(str(claims["iss"]), nkeys.PREFIX_BYTE_SERVER)
        key.verify(f"{header_part}.{claims_part}".encode(), _unb64(signature_part))
        nats_claims = claims["nats"]
        if claims.get("aud") != REQUEST_AUDIENCE or nats_claims.get("type") != "authorization_request":
            raise InvalidCalloutRequest("not an authorization request")
        client_info = nats_claims.get("client_info") or {}
        return CalloutRequest(
            user_nkey=str(nats_claims["user_nkey"]),
            server_id=str(nats_claims["server_id"]["id"]),
            token=str((nats_claims.get("connect_opts") or {}).get("auth_token") or ""),
            client_name=str(client_info.get("name") or ""),
            client_id=int(client_info.get("id") or 0),
            server_name=str(nats_claims["server_id"].get("name") or ""),
        )
    except InvalidCalloutRequest:
        raise
    except nacl.exceptions.BadSignatureError:
        raise InvalidCalloutRequest("bad request signature") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, binascii.Error):
        raise InvalidCalloutRequest("malformed authorization request") from None


_HEADER_PART = _b64(json.dumps(HEADER, separators=(",", ":")).encode())


def encode_jwt(claims: dict[str, Any], signer: nkeys.KeyPair) -> str:
    """A NATS JWT of ``claims`` (a non-empty object without ``jti``) signed by ``signer``.

    The claims are serialised once: ``jti`` is the hash of that text (the claims without it, as
    the NATS JWT library computes it; the server does not check it) and is appended to it."""
    text = json.dumps(claims, separators=(",", ":"))
    jti = base64.b32encode(hashlib.sha256(text.encode()).digest()).decode().rstrip("=")
    payload = _b64(f'{text[:-1]},"jti":"{jti}"}}'.encode())
    signed = f"{_HEADER_PART}.{payload}"
    return f"{signed}.{_b64(signer.sign(signed.encode()))}"


class CalloutSigner:
    """Signs authorization responses (and the user JWTs inside them) with the issuer account key."""

    def __init__(self, issuer_seed: str) -> None:
        self.keys = nkeys.from_seed(issuer_seed.encode())
        self.issuer = self.keys.public_key.decode()

    def user_jwt(
        self,
        request: CalloutRequest,
        identity: Identity,
        now: int,
        limits: ConnectionLimits | None = None,
        principal_scoped: bool = False,
    ) -> str:
        permissions = tenant_permissions(
            identity.tenant, identity.subject, principal_scoped=principal_scoped, scopes=identity.scopes
        )
        limits = limits or ConnectionLimits()
        claims = {
            "iss": self.issuer,
            "sub": request.user_nkey,
            "aud": APP_ACCOUNT,
            # The connection's user name on the broker: its CONNECT/DISCONNECT events and CONNZ
            # carry it, which is how the tenant's connections are counted (tenant ids hold no "/").
            "name": f"{identity.tenant}/{identity.subject}"[:200],
            "iat": now,
            "exp": min(identity.expires_at, now + MAX_USER_TTL_S),
            "nats": {
                "type": "user",
                "version": 2,
                "pub": {"allow": list(permissions.publish)},
                "sub": {"allow": list(permissions.subscribe)},
                # From the tenant's policy, for the broker to enforce on this connection; nats-server
                # 2.15 does not apply them to callout-issued users yet (docs/security.md).
                "subs": limits.max_subscriptions,
                "data": -1,
                "payload": limits.max_payload_bytes,
            },
        }
        return encode_jwt(claims, self.keys)

    def response(
        self,
        request: CalloutRequest,
        *,
        identity: Identity | None = None,
        error: str | None = None,
        limits: ConnectionLimits | None = None,
        principal_scoped: bool = False,
    ) -> bytes:
        """The authorization response: a user JWT for ``identity`` (with ``limits``, and scoped
        to its principal's inbox and events if asked), or ``error``."""
        now = int(time.time())
        nats_claims: dict[str, Any] = {"type": "authorization_response", "version": 2}
        if identity is not None:
            nats_claims["jwt"] = self.user_jwt(request, identity, now, limits, principal_scoped)
        else:
            nats_claims["error"] = error or "not authorized"
        claims = {
            "iss": self.issuer,
            "sub": request.user_nkey,
            "aud": request.server_id,
            "iat": now,
            "nats": nats_claims,
        }
        return encode_jwt(claims, self.keys).encode()
