"""The broker's figures per tenant, from its HTTP monitoring endpoint (``/connz``): on a
cluster, every node's (``CORRAL_MONITOR_BROKER_HTTP`` names them, comma-separated), each node
listing its own connections, summed per tenant.

Tenants' users are named ``<tenant>/<principal>`` by the auth callout; every connection in the
``APP`` account with such a name counts for its tenant. Paged with ``offset``/``limit``.

- open connections and their subscriptions, from the open connections;
- *slow consumers*: the broker closes a client connection whose outbound data it cannot deliver
  in time, past ``max_pending`` bytes (``reason`` "Slow Consumer (Pending Bytes)") or past the
  ``write_deadline`` (``reason`` "Slow Consumer (Write Deadline)"); nats-server never keeps a
  client connection open as a slow consumer. Each such closed connection (by ``cid`` and
  ``start``) is counted once, since the monitor started, also once the broker's list of closed
  connections (the last ``max_closed_clients``, 10,000) has dropped it;
- *stalled* open connections: the broker holds a publisher back (``stalls``, cumulative per
  connection) when a subscriber's pending bytes pass three quarters of ``max_pending``, the step
  before closing it as a slow consumer; an open connection whose ``stalls`` grew since the last
  reading is counted as stalled now.
"""

from __future__ import annotations

from typing import Any

import httpx

from contracts.tenants import is_tenant_id

PAGE = 1024
MAX_PAGES = 200  # 200k connections: a bound on one reading, whatever the broker says
MAX_TENANTS = 100_000  # tenants whose slow consumers are remembered (the rest are not counted)


class BrokerConnections:
    def __init__(self, base_url: str, *, timeout_s: float = 2.0, client: httpx.AsyncClient | None = None) -> None:
        """``base_url``: a node's monitoring endpoint, or several, comma-separated (a cluster)."""
        self.base_urls = [url.strip().rstrip("/") for url in base_url.split(",") if url.strip()]
        self.base_url = ",".join(self.base_urls)
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        # Slow consumers counted so far per tenant, and those the broker still lists (not again).
        self.slow_consumers: dict[str, int] = {}
        self._slow_seen: set[tuple[str, str, str]] = set()
        self._stalls: dict[tuple[str, str, str], int] = {}  # open connection -> its stalls at the last reading

    async def read(self) -> dict[str, tuple[int, int, int, int]]:
        """tenant -> (connections, subscriptions, slow consumers, stalled connections); raises
        httpx errors (and then counts nothing of that reading)."""
        opened, closed = await self._all("open"), await self._all("closed")
        found: dict[str, list[int]] = {}
        stalls: dict[tuple[str, str, str], int] = {}
        for connection in opened:
            tenant = _tenant_of(connection)
            if tenant is None:
                continue
            figures = found.setdefault(tenant, [0, 0, 0, 0])
            figures[0] += 1
            figures[1] += _count(connection.get("subscriptions"))
            if stalled := _count(connection.get("stalls")):
                identity = _identity(connection)
                stalls[identity] = stalled
                if stalled > self._stalls.get(identity, 0):
                    figures[3] += 1
        self._stalls = stalls
        listed: set[tuple[str, str, str]] = set()
        for connection in closed:
            tenant = _tenant_of(connection)
            if tenant is None or not str(connection.get("reason", "")).lower().startswith("slow consumer"):
                continue
            identity = _identity(connection)
            listed.add(identity)
            if identity not in self._slow_seen and (
                tenant in self.slow_consumers or len(self.slow_consumers) < MAX_TENANTS
            ):
                self.slow_consumers[tenant] = self.slow_consumers.get(tenant, 0) + 1
        self._slow_seen = listed  # the broker's list only loses old ones: those never come back
        for tenant, slow in self.slow_consumers.items():
            found.setdefault(tenant, [0, 0, 0, 0])[2] = slow
        return {tenant: (f[0], f[1], f[2], f[3]) for tenant, f in found.items()}

    async def _all(self, state: str) -> list[dict[str, Any]]:
        """Every node's connections in ``state``, each marked with its node (``_node``): client
        ids are per node."""
        out: list[dict[str, Any]] = []
        for node in self.base_urls:
            for connection in await self._node(node, state):
                connection["_node"] = node
                out.append(connection)
        return out

    async def _node(self, node: str, state: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for page in range(MAX_PAGES):
            params = {"acc": "APP", "auth": "1", "state": state, "offset": page * PAGE, "limit": PAGE}
            reply = await self._client.get(f"{node}/connz", params=params)
            reply.raise_for_status()
            body = reply.json()
            if not isinstance(body, dict):
                raise ValueError("the broker's /connz answer is not a JSON object")
            connections = body.get("connections") or []  # null when there are none
            if not isinstance(connections, list):
                raise ValueError("the broker's /connz connections are not a list")
            out += [connection for connection in connections if isinstance(connection, dict)]
            if len(connections) < PAGE:
                break
        return out

    async def aclose(self) -> None:
        await self._client.aclose()


def _identity(connection: dict[str, Any]) -> tuple[str, str, str]:
    """A connection, across readings: its node, ``cid`` and start (cids are per node, and start
    again with a restarted one)."""
    return (str(connection.get("_node", "")), str(connection.get("cid")), str(connection.get("start")))


def _count(value: Any) -> int:
    """A count from the broker's JSON (0 for anything that is not a non-negative integer)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _tenant_of(connection: dict[str, Any]) -> str | None:
    user = str(connection.get("authorized_user") or "")
    tenant, slash, _ = user.partition("/")
    return tenant if slash and is_tenant_id(tenant) else None
