"""Wiring of the router service: ``python -m services.router``."""

from services.router.handlers import register
from services.router.manifest import MANIFEST
from services.runtime.service import catalog_service, run_service

build = catalog_service(MANIFEST, register)

if __name__ == "__main__":
    run_service(build, MANIFEST)
