"""The monitor's declaration: it asks every service for its statistics, never reads tenant
traffic, and answers a tenant's query for its own figures."""

from contracts import subjects
from contracts.envelope import Kind, MonitorQuery
from services.monitor.settings import MonitorSettings
from services.runtime.manifest import Consume, Manifest

MANIFEST = Manifest(
    name="monitor",
    summary="Gathers every service's per-tenant statistics; serves Prometheus metrics and a JSON API",
    consumes=(
        Consume(
            "query",
            subjects.MONITOR_QUERIES,
            Kind.MONITOR_QUERY,
            MonitorQuery,
            "The sender's tenant's figures over the last minute (as GET /api/tenants/<tenant>; with "
            "subjects, its per-subject rows); t.<tenant>.monitor.query.<principal>, that tenant only",
            tenant_facing=True,
        ),
    ),
    requests=(subjects.ALL_STATS,),
    settings=MonitorSettings,
    audit=False,
)
