"""Wiring of the tools service: ``python -m services.tools``."""

from services.runtime.service import catalog_service, run_service
from services.tools.handlers import register
from services.tools.manifest import MANIFEST

build = catalog_service(MANIFEST, register)

if __name__ == "__main__":
    run_service(build, MANIFEST)
