"""Wiring of the graph service: ``python -m services.graph``."""

from services.graph.handlers import register
from services.runtime.catalog import load_catalog
from services.runtime.service import Service, run_service
from services.runtime.settings import Settings


def build(settings: Settings) -> Service:
    service = Service("graph", settings)
    register(service, load_catalog(settings.definitions))
    return service


if __name__ == "__main__":
    run_service(build)
