"""Wiring of the tools service: ``python -m services.tools``."""

from services.runtime.catalog import load_catalog
from services.runtime.service import Service, run_service
from services.runtime.settings import Settings
from services.tools.handlers import register


def build(settings: Settings) -> Service:
    service = Service("tools", settings)
    register(service, load_catalog(settings.definitions))
    return service


if __name__ == "__main__":
    run_service(build)
