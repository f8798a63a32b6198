"""Writing refused connections to tenants' audit trails.

The auth service lives in the ``AUTH`` account, so it keeps a second connection in ``APP`` as a
user that may only append ``auth`` records. Only refusals of tokens a trusted key signed are
attributed to a tenant; for anything else the tenant claim is the attacker's choice, and the
refusal is logged but not written into somebody's trail.
"""

from __future__ import annotations

from typing import Any

import nats

from contracts import subjects
from services.auth.errors import Denied
from services.runtime.audit import AuditTrail
from services.runtime.connection import quick_reconnects


class DenialAudit:
    def __init__(self, url: str, user: str, password: str, log: Any) -> None:
        self.url, self.user, self.password, self.log = url, user, password, log
        self.nc: Any = None
        self.trail: AuditTrail | None = None

    async def start(self) -> None:
        self.nc = await nats.connect(
            self.url,
            user=self.user,
            password=self.password,
            name="corral-auth-audit",
            inbox_prefix=subjects.service_inbox_prefix(self.user).encode(),
            max_reconnect_attempts=-1,
            reconnect_to_server_handler=quick_reconnects(first_s=0.0, most_s=1.0),
        )
        self.trail = AuditTrail(self.nc, "auth", self.log)
        await self.trail.start()

    def record(self, error: Denied, client: str) -> None:
        if error.tenant is not None and self.trail is not None:
            self.trail.record(error.tenant, "auth_denied", "refused", reason=error.message, client=client)

    async def stop(self) -> None:
        if self.trail is not None:
            await self.trail.stop()
        if self.nc is not None:
            await self.nc.drain()
