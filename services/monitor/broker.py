"""The broker's figures per tenant, from its HTTP monitoring endpoint (``/connz``).

Tenants' users are named ``<tenant>/<principal>`` by the auth callout; every connection in the
``APP`` account with such a name counts for its tenant: open connections and their subscriptions
from the open connections, slow consumers from the closed ones the broker still remembers (its
``reason`` says ``Slow Consumer``). Paged with ``offset``/``limit``.
"""

from __future__ import annotations

from typing import Any

import httpx

from contracts.tenants import is_tenant_id

PAGE = 1024
MAX_PAGES = 200  # 200k connections: a bound on one reading, whatever the broker says


class BrokerConnections:
    def __init__(self, base_url: str, *, timeout_s: float = 2.0, client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.AsyncClient(timeout=timeout_s)

    async def read(self) -> dict[str, tuple[int, int, int]]:
        """tenant -> (connections, subscriptions, slow consumers); raises httpx errors."""
        found: dict[str, list[int]] = {}
        for connection in await self._all("open"):
            tenant = _tenant_of(connection)
            if tenant is not None:
                figures = found.setdefault(tenant, [0, 0, 0])
                figures[0] += 1
                figures[1] += int(connection.get("subscriptions", 0) or 0)
        for connection in await self._all("closed"):
            tenant = _tenant_of(connection)
            if tenant is not None and "slow consumer" in str(connection.get("reason", "")).lower():
                found.setdefault(tenant, [0, 0, 0])[2] += 1
        return {tenant: (f[0], f[1], f[2]) for tenant, f in found.items()}

    async def _all(self, state: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for page in range(MAX_PAGES):
            params = {"acc": "APP", "auth": "1", "state": state, "offset": page * PAGE, "limit": PAGE}
            reply = await self._client.get(f"{self.base_url}/connz", params=params)
            reply.raise_for_status()
            connections = reply.json().get("connections") or []
            out += connections
            if len(connections) < PAGE:
                break
        return out

    async def aclose(self) -> None:
        await self._client.aclose()


def _tenant_of(connection: dict[str, Any]) -> str | None:
    user = str(connection.get("authorized_user") or "")
    tenant, slash, _ = user.partition("/")
    return tenant if slash and is_tenant_id(tenant) else None
