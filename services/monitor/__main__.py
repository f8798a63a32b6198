"""Wiring of the monitor: ``python -m services.monitor``."""

from services.monitor.access import Access
from services.monitor.handlers import register
from services.monitor.manifest import MANIFEST
from services.monitor.settings import MonitorSettings
from services.monitor.view import View
from services.runtime.catalog import load_catalog
from services.runtime.jwks import JwksKeys
from services.runtime.service import Service, run_service
from services.runtime.settings import Settings
from services.runtime.tokens import verifier_of


def build(base: Settings) -> Service:
    settings = MonitorSettings(**base.model_dump()).resolved()
    if (settings.auth_keys_file or settings.auth_jwks_url) and not (settings.auth_issuer and settings.auth_audience):
        # As the auth service (RFC 8725): an identity provider's keys sign tokens for other audiences too.
        raise SystemExit("monitor: identity-provider keys need CORRAL_AUTH_ISSUER and CORRAL_AUTH_AUDIENCE")
    service = Service(MANIFEST, settings)
    # Which tenants keep their users apart (their policies): their figures need the monitor's
    # scope, and a query's answer goes only to the asking principal's own inbox.
    catalog = load_catalog(settings.definitions_paths())
    service.follow_tenants(catalog)  # principal_scoped, as the tenant registry has it now
    verifier = verifier_of(settings)
    jwks = None
    if settings.auth_jwks_url:  # the auth service's cache: fetched at start, again on an unknown kid
        jwks = JwksKeys(settings.auth_jwks_url, verifier, min_refresh_s=settings.auth_jwks_min_refresh_s)
    if not settings.monitor_operator_token:
        service.log.warning("monitor_no_operator_token", reason="no CORRAL_MONITOR_OPERATOR_TOKEN or state directory")
    register(
        service,
        settings,
        View(max_tenants=settings.monitor_max_tenants),
        Access(
            settings.monitor_operator_token,
            verifier,
            jwks,
            principal_scoped=lambda tenant: service.principal_scoped(tenant),  # as the service knows it now
            scope=settings.monitor_scope,
        ),
    )
    return service


if __name__ == "__main__":
    run_service(build, MANIFEST)
