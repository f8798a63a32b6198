"""Wiring of the workflow service: ``python -m services.workflow``."""

from services.runtime.service import catalog_service, run_service
from services.workflow.handlers import register
from services.workflow.manifest import MANIFEST

build = catalog_service(MANIFEST, register)

if __name__ == "__main__":
    run_service(build, MANIFEST)
