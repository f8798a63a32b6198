"""The monitor: every service's per-operation, per-tenant statistics, the auth service's grants and
denials and the broker's connections, gathered once a second and served as Prometheus metrics and
a JSON API (see ``docs/monitor.md``). It never reads payloads: it only asks for statistics."""
