"""Settings of the monitor (``CORRAL_MONITOR_*``; tenant tokens are checked with the auth
service's own ``CORRAL_AUTH_*`` settings, so both accept the same tokens)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from services.runtime.credentials import load_secrets
from services.runtime.settings import Settings

# The services whose statistics it reads. services/registry.py is the list, but a service may not
# import it (tests/unit/test_layers.py); tests/unit/test_monitor.py checks the two agree.
SERVICES = ("auth", "router", "graph", "tools", "workflow", "swarm", "monitor")


class MonitorSettings(Settings):
    # host:port of its HTTP server (/metrics, /api, the page); port 0: a free one (logged).
    monitor_http: str = "127.0.0.1:8791"
    monitor_interval_s: float = Field(default=1.0, gt=0, le=60)
    # How long it collects the replicas' answers to one statistics request.
    monitor_reply_window_s: float = Field(default=0.25, gt=0, le=10)
    monitor_services: tuple[str, ...] = SERVICES
    monitor_top_k: int = Field(default=20, ge=0, le=10_000)  # tenants with a label of their own
    monitor_full_tenants: bool = False  # every tenant labelled in /metrics (opt-in: large scrapes)
    monitor_max_tenants: int = Field(default=20_000, ge=1)
    monitor_operator_token: str | None = None  # else the state directory's secrets
    # The broker's monitoring endpoint (http://127.0.0.1:8222), or each node's of a cluster,
    # comma-separated; else read from the state's nats.conf.
    monitor_broker_http: str | None = None
    monitor_broker_interval_s: float = Field(default=5.0, gt=0)
    # The scope a principal-scoped tenant's token needs to see that tenant's figures (its users'
    # traffic); tenants that are not principal-scoped need none.
    monitor_scope: str = Field(default="monitor", min_length=1, max_length=128)
    # Tenant tokens, as the auth service checks them (services/auth/settings.py).
    auth_dev_key: str | None = None
    auth_dev_mode: bool = True
    auth_tenant_claim: str = "tenant_id"
    auth_issuer: str | None = None
    auth_audience: str | None = None
    auth_keys_file: Path | None = None
    auth_jwks_url: str | None = None  # the identity provider's JWKS, fetched as the auth service does
    auth_jwks_min_refresh_s: float = Field(default=30.0, ge=0, le=86_400)
    auth_required_scope: str | None = None
    auth_leeway_s: float = Field(default=30.0, ge=0, le=300)

    def resolved(self) -> MonitorSettings:
        """These settings with the operator token, dev key and broker endpoint from the state directory."""
        if self.state_dir is None:
            return self
        update: dict[str, object] = {}
        secrets = load_secrets(self.state_dir)
        if not self.monitor_operator_token:
            update["monitor_operator_token"] = secrets.monitor_operator_token or None
        if not self.auth_dev_key:
            update["auth_dev_key"] = secrets.dev_key
        if not self.monitor_broker_http:
            update["monitor_broker_http"] = broker_endpoint(self.state_dir / "nats.conf")
        return self.model_copy(update=update)


def broker_endpoint(config: Path) -> str | None:
    """The monitoring endpoint ``corral init`` enabled in ``nats.conf`` (JSON), if any."""
    try:
        found = json.loads(config.read_text()).get("http")
    except (OSError, ValueError, AttributeError):
        return None
    return f"http://{found}" if isinstance(found, str) and found else None
