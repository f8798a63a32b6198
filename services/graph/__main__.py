"""Wiring of the graph service: ``python -m services.graph``."""

from services.graph.handlers import register
from services.graph.manifest import MANIFEST
from services.runtime.service import catalog_service, run_service

build = catalog_service(MANIFEST, register)

if __name__ == "__main__":
    run_service(build, MANIFEST)
