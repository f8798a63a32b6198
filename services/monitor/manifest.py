"""The monitor's declaration: it only asks every service for its statistics, never tenant traffic."""

from contracts import subjects
from services.monitor.settings import MonitorSettings
from services.runtime.manifest import Manifest

MANIFEST = Manifest(
    name="monitor",
    summary="Gathers every service's per-tenant statistics; serves Prometheus metrics and a JSON API",
    consumes=(),
    requests=(subjects.ALL_STATS,),
    settings=MonitorSettings,
    audit=False,
)
