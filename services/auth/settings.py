"""Settings of the auth service (``CORRAL_AUTH_*``); secrets fall back to the state directory."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.runtime.credentials import load_secrets
from services.runtime.settings import Settings

# Verified tokens the callout remembers by default (services/auth/token_cache.py): about 0.5 KB each.
TOKEN_CACHE_ENTRIES = 100_000


class AuthSettings(Settings):
    auth_issuer_seed: str | None = None  # account nkey seed (SA...) that signs callout responses
    auth_dev_key: str | None = None  # HS256 key of development tokens
    auth_dev_mode: bool = True  # accept development tokens (HS256, no kid)
    auth_tenant_claim: str = "tenant_id"  # a claim name, or a dotted path such as org.id
    auth_issuer: str | None = None  # required `iss` of identity-provider tokens
    auth_audience: str | None = None  # required `aud` of identity-provider tokens
    auth_keys_file: Path | None = None  # JSON or YAML list of {kid, alg, public_key_pem}
    auth_jwks_url: str | None = None  # the identity provider's JWKS (keys need kid and alg)
    auth_jwks_min_refresh_s: float = Field(default=30.0, ge=0, le=86_400)
    auth_required_scope: str | None = None  # a scope (or role) every token must carry
    auth_leeway_s: float = Field(default=30.0, ge=0, le=300)
    # The APP-account user that writes refusals to tenants' audit trails (else from the state dir).
    auth_audit_user: str = "auth-audit"
    auth_audit_password: str | None = None
    # The system-account user that follows the tenants' connections, to enforce each tenant's
    # connection.max_connections (else from the state directory; without it, not enforced).
    auth_system_user: str = "auth-system"
    auth_system_password: str | None = None
    # How often that user closes tenant connections past connection.max_subscriptions (the broker
    # does not apply it to callout users); 0 turns it off.
    auth_subscriptions_check_s: float = Field(default=2.0, ge=0, le=3600)
    # Verified tokens remembered until their exp, so a reconnect costs no signature check
    # (services/auth/token_cache.py); 0 turns the cache off.
    auth_token_cache: int = Field(default=TOKEN_CACHE_ENTRIES, ge=0, le=10_000_000)

    def resolved(self) -> AuthSettings:
        """These settings with the issuer seed, dev key and passwords from the state directory if unset."""
        secret = (self.auth_issuer_seed, self.auth_dev_key, self.auth_audit_password, self.auth_system_password)
        if all(secret) or self.state_dir is None:
            return self
        secrets = load_secrets(self.state_dir)
        return self.model_copy(
            update={
                "auth_issuer_seed": self.auth_issuer_seed or secrets.issuer_seed,
                "auth_dev_key": self.auth_dev_key or secrets.dev_key,
                "auth_audit_password": self.auth_audit_password or secrets.passwords.get(self.auth_audit_user),
                "auth_system_password": self.auth_system_password or secrets.passwords.get(self.auth_system_user),
            }
        )
