"""Wiring of the auth service: ``python -m services.auth``."""

from services.auth.callout import CalloutSigner
from services.auth.handlers import register
from services.auth.settings import AuthSettings
from services.auth.tokens import TokenVerifier, load_keys
from services.runtime.service import Service, run_service
from services.runtime.settings import Settings


def build(base: Settings) -> Service:
    settings = AuthSettings(**base.model_dump()).resolved()
    if not settings.auth_issuer_seed:
        raise SystemExit("auth: set CORRAL_AUTH_ISSUER_SEED or CORRAL_STATE_DIR")
    verifier = TokenVerifier(
        dev_key=settings.auth_dev_key if settings.auth_dev_mode else None,
        keys=load_keys(settings.auth_keys_file) if settings.auth_keys_file else None,
        tenant_claim=settings.auth_tenant_claim,
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
        required_scope=settings.auth_required_scope,
        leeway_s=settings.auth_leeway_s,
    )
    service = Service("auth", settings, ping=False, audit=False)  # AUTH account: no tenant subjects
    register(service, verifier, CalloutSigner(settings.auth_issuer_seed))
    return service


if __name__ == "__main__":
    run_service(build)
