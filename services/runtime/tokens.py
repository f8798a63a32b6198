"""Validating tenants' application JWTs (RFC 8725 practice) and minting development tokens.

In the runtime because two services verify tenants' tokens: the auth service (the broker's
callout) and the monitor (a tenant's bearer token on its HTTP API); ``services/auth/tokens.py``
re-exports it.

The algorithm is pinned per key: the token's ``kid`` selects a configured key and that key's one
algorithm is the only one PyJWT may accept, which refuses ``alg=none`` and RS256/HS256 key
confusion. Tokens without a ``kid`` are development tokens (HS256 with the state directory's
key), accepted only in development mode.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import yaml

from contracts.errors import InvalidRequest, Unauthorized
from contracts.subjects import MAX_PRINCIPAL_BYTES
from contracts.tenants import is_tenant_id, validate_tenant_id
from contracts.tokens import scopes_in


class Denied(Unauthorized):
    """A tenant's connection refused by the auth service."""

    def __init__(self, message: str, *, tenant: str | None = None) -> None:
        super().__init__(message)
        # Set only when a trusted key signed the token: then the refusal goes to that tenant's
        # audit trail. An unverified claim is the attacker's to choose, so it is never used.
        self.tenant = tenant


class InvalidToken(Denied):
    """The application token is malformed, wrongly signed, expired or lacks a required claim."""


DEV_ALGORITHM = "HS256"
DEV_ISSUER = "corral-dev"
DEV_AUDIENCE = "corral"
ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"})


@dataclass(frozen=True)
class Identity:
    tenant: str
    subject: str
    expires_at: int  # unix seconds
    # The token's scopes and roles (``scope``, ``scp``, ``roles``, ``groups``): granted as the
    # signal subjects a holder may send on (a workflow approval that requires one).
    scopes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class VerificationKey:
    kid: str
    algorithm: str
    key: Any  # a public key object (or PEM) for the algorithm


def load_keys(path: Path) -> dict[str, VerificationKey]:
    """Keys from a JSON or YAML list of ``{kid, alg, public_key_pem}``; only asymmetric algorithms."""
    entries = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    keys = {}
    for entry in entries or []:
        algorithm = entry.get("alg")
        if algorithm not in ASYMMETRIC:
            raise InvalidRequest(f"key {entry.get('kid')!r}: algorithm {algorithm!r} is not an allowed public-key one")
        keys[entry["kid"]] = VerificationKey(entry["kid"], algorithm, entry["public_key_pem"])
    return keys


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """A claim by name (``custom:tenant_id``) or, failing that, by dotted path (``org.id``)."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for step in path.split("."):
        if not isinstance(value, dict) or step not in value:
            return None
        value = value[step]
    return value


class TokenVerifier:
    def __init__(
        self,
        *,
        dev_key: str | None,
        keys: dict[str, VerificationKey] | None = None,
        tenant_claim: str = "tenant_id",
        issuer: str | None = None,
        audience: str | None = None,
        required_scope: str | None = None,
        leeway_s: float = 30.0,
    ) -> None:
        self.dev_key = dev_key
        self.keys = keys or {}
        self.tenant_claim = tenant_claim
        self.issuer = issuer
        self.audience = audience
        self.required_scope = required_scope
        self.leeway_s = leeway_s

    def verify(self, token: str) -> Identity:
        """The identity in a valid token; :class:`InvalidToken` with a reason otherwise."""
        if not token:
            raise InvalidToken("no token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed token: its key id is not a string")
        if kid is not None:
            entry = self.keys.get(kid)
            if entry is None:
                raise InvalidToken(f"unknown key id {str(kid)[:64]!r}")
            key, algorithm, issuer, audience = entry.key, entry.algorithm, self.issuer, self.audience
        elif self.dev_key is not None:
            key, algorithm, issuer, audience = self.dev_key, DEV_ALGORITHM, DEV_ISSUER, DEV_AUDIENCE
        else:
            raise InvalidToken("token has no key id and development tokens are disabled")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=issuer,
                audience=audience,
                leeway=self.leeway_s,
                options={"require": ["exp", "sub"] + (["iss"] if issuer else []) + (["aud"] if audience else [])},
            )
        except jwt.InvalidAlgorithmError:
            raise InvalidToken(f"algorithm not allowed for this key (expected {algorithm})") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except (
            jwt.ExpiredSignatureError,
            jwt.ImmatureSignatureError,
            jwt.InvalidIssuerError,
            jwt.InvalidAudienceError,
            jwt.MissingRequiredClaimError,
        ) as exc:
            # PyJWT checks claims only after the signature: this token was signed by a trusted key,
            # so its tenant (if well-formed) may be told about the refusal.
            reason = {
                jwt.ExpiredSignatureError: "token expired",
                jwt.ImmatureSignatureError: "token not yet valid",
            }.get(type(exc), f"invalid token: {exc}")
            if isinstance(exc, jwt.ImmatureSignatureError) and "(iat)" in str(exc):
                reason = "token not yet valid: issued in the future"  # PyJWT checks iat against the leeway
            raise InvalidToken(
                reason, tenant=self._claimed_tenant(jwt.decode(token, options={"verify_signature": False}))
            ) from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"invalid token: {exc}") from None
        return self._identity(claims)

    def _claimed_tenant(self, claims: dict[str, Any]) -> str | None:
        tenant = claim_at(claims, self.tenant_claim)
        return tenant if is_tenant_id(tenant) else None

    def _identity(self, claims: dict[str, Any]) -> Identity:
        tenant = claim_at(claims, self.tenant_claim)
        if tenant is None:
            raise InvalidToken(f"token has no {self.tenant_claim!r} claim")
        try:
            validate_tenant_id(tenant)
        except InvalidRequest:
            raise InvalidToken(f"token's tenant claim is not a valid tenant id: {str(tenant)[:80]!r}") from None
        if self.required_scope is not None and self.required_scope not in scopes_in(claims):
            raise InvalidToken(f"token lacks the required scope {self.required_scope!r}", tenant=tenant)
        subject = str(claims["sub"])
        if not subject or len(subject.encode()) > MAX_PRINCIPAL_BYTES:  # it names the principal in subjects
            raise InvalidToken(f"the token's subject must be 1 to {MAX_PRINCIPAL_BYTES} bytes", tenant=tenant)
        return Identity(tenant=tenant, subject=subject, expires_at=int(claims["exp"]), scopes=scopes_in(claims))


def verifier_of(settings: Any) -> TokenVerifier:
    """The verifier of tenant tokens that ``settings`` (the ``CORRAL_AUTH_*`` ones, as the auth
    service and the monitor read them) describe."""
    return TokenVerifier(
        dev_key=settings.auth_dev_key if settings.auth_dev_mode else None,
        keys=load_keys(settings.auth_keys_file) if settings.auth_keys_file else None,
        tenant_claim=settings.auth_tenant_claim,
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
        required_scope=settings.auth_required_scope,
        leeway_s=settings.auth_leeway_s,
    )


def mint_dev_token(tenant: str, *, key: str, sub: str = "dev", ttl_s: int = 3600, scopes: tuple[str, ...] = ()) -> str:
    """A development token for ``tenant`` (HS256 with the state directory's key)."""
    validate_tenant_id(tenant)
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": DEV_ISSUER,
        "aud": DEV_AUDIENCE,
        "sub": sub,
        "tenant_id": tenant,
        "iat": now,
        "exp": now + ttl_s,
    }
    if scopes:
        claims["scope"] = " ".join(scopes)
    return jwt.encode(claims, key, algorithm=DEV_ALGORITHM)
