"""Settings from ``CORRAL_*`` environment variables (one prefix for everything)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.definitions import DefinitionError
from services.runtime.catalog import split_paths


class Settings(BaseSettings):
    """Common settings of every service. Credentials come from the environment first, else from
    the state directory written by ``corral init``/``corral up``."""

    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str | None = None
    nats_password: str | None = None
    state_dir: Path | None = None
    # Definitions files or folders, several separated by ':' (os.pathsep), all merged; unset, the
    # state directory's ``definitions/`` (which `corral init` fills with the demo the first time).
    definitions: str | Path | None = None
    # auto: the console format on a terminal, JSON lines otherwise (services/runtime/logging.py).
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: str = "info"
    # The one line per finished run (run_finished): every run, only those not ending ok, or none.
    log_runs: Literal["all", "failed", "off"] = "all"
    # This replica's index among its service's (corral up sets it): its name in logs, graph-2.
    replica: str | None = None
    # Messages handled concurrently per replica, and at most this many of one tenant's
    # (services/runtime/fairness.py); more wait in their tenant's queue, up to the limits below,
    # and past them are refused at once (rate_limited).
    max_in_flight: int = Field(default=512, ge=1)
    max_in_flight_per_tenant: int = Field(default=64, ge=1)
    max_queued_per_tenant: int = Field(default=256, ge=0)
    max_queued: int = Field(default=4096, ge=0)
    # Used when a request carries no deadline.
    default_timeout_s: float = Field(default=30.0, gt=0)
    # Argument names that would carry a tenant: removed from every tool call (JSON list in the env).
    tenant_argument_aliases: tuple[str, ...] = ("tenant_id", "tenant", "tenantId")
    # How often the router asks whether an executor is running (see services/runtime/liveness.py).
    probe_interval_s: float = Field(default=1.0, gt=0)
    # How long a stopping service waits for in-flight messages.
    drain_timeout_s: float = Field(default=10.0, gt=0)
    # How long a starting service waits to have read the tenant registry before it serves (then
    # with the definitions files' tenants, the registry's following as they arrive).
    registry_wait_s: float = Field(default=10.0, ge=0)
    # Copies of every stream and bucket Corral creates (the audit trail, the tenant registry, the
    # workflow engine's, the swarm's sessions): 1 on one broker, 3 on a three-node cluster.
    jetstream_replicas: int = Field(default=1, ge=1, le=5)
    # Spans with OpenTelemetry (services/runtime/tracing.py, the `traces` extra): off, otlp (to
    # OTEL_EXPORTER_OTLP_ENDPOINT) or console (debugging). Off, the trace context is only carried on.
    traces: Literal["off", "otlp", "console"] = "off"

    def definitions_paths(self) -> list[Path]:
        """Where the definitions are: ``CORRAL_DEFINITIONS``, else ``<state dir>/definitions``."""
        if isinstance(self.definitions, Path):
            return [self.definitions]
        if self.definitions:
            return split_paths(self.definitions)
        if self.state_dir is not None:
            return [self.state_dir / "definitions"]
        raise DefinitionError("no definitions: set CORRAL_DEFINITIONS or CORRAL_STATE_DIR")

    # The name from before several paths were allowed (still used by services/auth and tests):
    # the same list, which load_catalog takes.
    definitions_path = definitions_paths


def jetstream_replicas() -> int:
    """``CORRAL_JETSTREAM_REPLICAS``, for code that creates a stream or a bucket without a
    service's settings at hand (the operator's commands, the audit stream's configuration)."""
    return Settings().jetstream_replicas
