"""Shared fixtures: real brokers on free loopback ports, cleaned up by the fixture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.support.brokers import SecuredBroker, plain_broker, secured_broker

# Two shared cores run the suite: timing-based health checks and deadlines would only add flakes.
settings.register_profile("corral", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("corral")


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """A plain JetStream server shared by the session (tests use unique subjects)."""
    with plain_broker() as url:
        yield url


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[SecuredBroker]:
    """A fresh server with the auth-callout configuration and its state directory."""
    with secured_broker(tmp_path / "state") as broker:
        yield broker
