"""Validating tenants' application JWTs and minting development tokens: the verifier lives in
``services/runtime/tokens.py`` (the monitor verifies tenants' tokens too); re-exported here."""

from services.runtime.tokens import (
    ASYMMETRIC,
    DEV_ALGORITHM,
    DEV_AUDIENCE,
    DEV_ISSUER,
    Identity,
    TokenVerifier,
    VerificationKey,
    claim_at,
    load_keys,
    mint_dev_token,
)

__all__ = [
    "ASYMMETRIC",
    "DEV_ALGORITHM",
    "DEV_AUDIENCE",
    "DEV_ISSUER",
    "Identity",
    "TokenVerifier",
    "VerificationKey",
    "claim_at",
    "load_keys",
    "mint_dev_token",
]
