"""Wiring of the monitor: ``python -m services.monitor``."""

from services.monitor.access import Access
from services.monitor.handlers import register
from services.monitor.manifest import MANIFEST
from services.monitor.settings import MonitorSettings
from services.monitor.view import View
from services.runtime.service import Service, run_service
from services.runtime.settings import Settings
from services.runtime.tokens import TokenVerifier, load_keys


def build(base: Settings) -> Service:
    settings = MonitorSettings(**base.model_dump()).resolved()
    service = Service(MANIFEST, settings)
    verifier = TokenVerifier(
        dev_key=settings.auth_dev_key if settings.auth_dev_mode else None,
        keys=load_keys(settings.auth_keys_file) if settings.auth_keys_file else None,
        tenant_claim=settings.auth_tenant_claim,
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
        required_scope=settings.auth_required_scope,
        leeway_s=settings.auth_leeway_s,
    )
    if not settings.monitor_operator_token:
        service.log.warning("monitor_no_operator_token", reason="no CORRAL_MONITOR_OPERATOR_TOKEN or state directory")
    register(
        service,
        settings,
        View(max_tenants=settings.monitor_max_tenants),
        Access(settings.monitor_operator_token, verifier),
    )
    return service


if __name__ == "__main__":
    run_service(build, MANIFEST)
