"""Wiring of the router: ``python -m services.router``."""

from services.router.handlers import register
from services.runtime.catalog import load_catalog
from services.runtime.service import Service, run_service
from services.runtime.settings import Settings


def build(settings: Settings) -> Service:
    service = Service("router", settings)
    register(service, load_catalog(settings.definitions))
    return service


if __name__ == "__main__":
    run_service(build)
