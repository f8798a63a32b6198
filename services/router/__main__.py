"""Wiring of the router service: ``python -m services.router``."""

from services.router.handlers import register
from services.runtime.service import catalog_service, run_service

build = catalog_service("router", register)

if __name__ == "__main__":
    run_service(build)
