"""Identity-provider keys from a JWKS URL: the cache lives in ``services/runtime/jwks.py`` (the
monitor verifies tenants' tokens with it too); re-exported here."""

from services.runtime.jwks import JwksKeys, parse_jwks, token_kid

__all__ = ["JwksKeys", "parse_jwks", "token_kid"]
