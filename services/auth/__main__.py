"""Wiring of the auth service: ``python -m services.auth``."""

from collections.abc import Mapping

from contracts.definitions import Catalog, DefinitionError, TenantPolicy
from services.auth.broker_connections import BrokerConnections
from services.auth.callout import CalloutSigner
from services.auth.denials import DenialAudit
from services.auth.departures import Departures
from services.auth.handlers import register
from services.auth.jwks import JwksKeys
from services.auth.manifest import MANIFEST
from services.auth.settings import AuthSettings
from services.runtime.catalog import load_catalog
from services.runtime.service import Service, run_service
from services.runtime.settings import Settings
from services.runtime.tenant_registry import LiveTenants, PolicyView
from services.runtime.tokens import verifier_of


def build(base: Settings) -> Service:
    settings = AuthSettings(**base.model_dump()).resolved()
    if not settings.auth_issuer_seed:
        raise SystemExit("auth: set CORRAL_AUTH_ISSUER_SEED or CORRAL_STATE_DIR")
    if (settings.auth_keys_file or settings.auth_jwks_url) and not (settings.auth_issuer and settings.auth_audience):
        raise SystemExit("auth: identity-provider keys need CORRAL_AUTH_ISSUER and CORRAL_AUTH_AUDIENCE (RFC 8725)")
    if settings.auth_jwks_url and not settings.auth_jwks_url.startswith(("https://", "http://")):
        raise SystemExit("auth: CORRAL_AUTH_JWKS_URL must be an https:// (or http://) URL")
    verifier = verifier_of(settings)
    service = Service(MANIFEST, settings)
    jwks = None
    if settings.auth_jwks_url:
        if not settings.auth_jwks_url.startswith("https://"):
            service.log.warning("auth_jwks_not_https", url=settings.auth_jwks_url)
        jwks = JwksKeys(settings.auth_jwks_url, verifier, min_refresh_s=settings.auth_jwks_min_refresh_s)
    denials = None
    if settings.auth_audit_password:
        denials = DenialAudit(settings.nats_url, settings.auth_audit_user, settings.auth_audit_password, service.log)
    else:
        service.log.warning("auth_denials_not_audited", reason="no CORRAL_AUTH_AUDIT_PASSWORD or state directory")
    connections = None
    if settings.auth_system_password:
        # A service replica whose connection closed (a kill -9 sends no leaving notice of its
        # own) is announced on its leaving subject, through the audit writer's APP connection.
        departures = Departures(denials, service.log, service.keep) if denials is not None else None
        connections = BrokerConnections(
            settings.nats_url,
            settings.auth_system_user,
            settings.auth_system_password,
            service.log,
            denials,
            departures=departures,
        )
    else:
        service.log.warning("auth_connections_not_limited", reason="no CORRAL_AUTH_SYSTEM_PASSWORD or state directory")
    signer = CalloutSigner(settings.auth_issuer_seed)
    catalog = _catalog(service)
    live = LiveTenants(catalog, service.log) if catalog is not None and denials is not None else None
    policies: Mapping[str, TenantPolicy] = PolicyView(live) if live else dict(catalog.tenants if catalog else {})
    register(
        service,
        verifier,
        signer,
        jwks,
        denials,
        policies,
        connections,
        subscriptions_check_s=settings.auth_subscriptions_check_s,
        cached_tokens=settings.auth_token_cache,
    )
    if live is not None and catalog is not None and denials is not None:
        # Through the APP connection the refusals are audited on (the callout's own lives in AUTH,
        # where the registry is not), once register's start-up has opened it.
        service.follow_tenants(catalog, connection=lambda: denials.nc, live=live)
    elif catalog is not None:
        service.log.warning("auth_registry_not_followed", reason="no APP connection (no audit credential)")
    return service


def _catalog(service: Service) -> Catalog | None:
    """The definitions (each tenant's connection limits and scope), or None without any."""
    try:
        paths = service.settings.definitions_paths()
    except DefinitionError:
        service.log.warning("auth_default_connection_limits", reason="no definitions configured")
        return None
    return load_catalog(paths)  # the same definitions as the other services: broken ones fail here too


if __name__ == "__main__":
    run_service(build, MANIFEST)
