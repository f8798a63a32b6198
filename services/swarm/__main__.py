"""Wiring of the swarm service: ``python -m services.swarm``."""

from services.runtime.service import catalog_service, run_service
from services.swarm.handlers import register
from services.swarm.manifest import MANIFEST

build = catalog_service(MANIFEST, register)

if __name__ == "__main__":
    run_service(build, MANIFEST)
