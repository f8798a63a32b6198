"""Announcing a service replica that left without saying so.

A replica that stops says it is leaving (``corral.leaving.<service>``, services/runtime/liveness.py)
before it stops taking messages, so the router stops passing runs on to it at once. A replica
killed with SIGKILL says nothing: the broker closes its connection, and until the router's next
probe (``CORRAL_PROBE_INTERVAL_S``, 1 s) every run passed on to the last replica went to nobody
and waited out its client's deadline. The auth service follows the broker's DISCONNECT events
(services/auth/broker_connections.py), so it says it for the dead replica, on the same subject,
through its audit writer's connection in APP (the only publish of it that is not an audit
record or a registry read). The router then looks again at once: a probe finds the other
replicas, or none, and requests go the long way and fail at once, typed.

What is still at risk: the runs passed on between the kill and the broker's event (the broker
sees the closed socket at once; the event and the notice take a few milliseconds more), as for
any run a replica held when it was killed (graph runs are at most once, docs/operations.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from contracts import subjects
from contracts.tenants import NAME_PATTERN
from services.auth.denials import DenialAudit


class Departures:
    """The DISCONNECT of a service user's connection (``departures`` of BrokerConnections) ->
    a leaving notice on ``corral.leaving.<user>``. Every static user's is sent (a service does
    not know which others are watched, services/runtime/manifest.py): only the watched
    services' subjects have subscribers (the router's executors), and the broker drops the rest."""

    def __init__(self, denials: DenialAudit, log: Any, keep: Callable[[asyncio.Task[Any]], Any]) -> None:
        self.denials = denials
        self.log = log
        self.keep = keep

    def __call__(self, user: str) -> None:
        if is_name(user):
            self.keep(asyncio.ensure_future(self._announce(user)))

    async def _announce(self, service: str) -> None:
        nc = self.denials.nc
        if nc is None or not nc.is_connected:
            return  # the watchers' probes notice it, as before
        try:
            await nc.publish(subjects.leaving(service), b"")
        except Exception as error:  # reconnecting: the watchers' probes notice it
            self.log.warning("service_departure_not_announced", service=service, error=repr(error))
            return
        self.log.debug("service_departure_announced", service=service)


def is_name(user: str) -> bool:
    """Whether ``user`` can name a leaving subject (a service's user name)."""
    return NAME_PATTERN.fullmatch(user) is not None
