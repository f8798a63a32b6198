"""How many connections each tenant holds open: the count the auth callout admits new ones by.

Pure bookkeeping, no I/O (the broker side is ``services/auth/broker_connections.py``). A
connection is known by its broker's id and its client id, ``(server, cid)``: the authorization
request carries both, and so do the broker's CONNECT and DISCONNECT events and its CONNZ
listing, so a grant, the connection it becomes and its end are matched exactly. One server never
reuses a client id, and a restarted server has a new id.

A tenant's count is its *open* connections (seen in a CONNECT event or a CONNZ listing) plus the
connections this replica has *granted* whose CONNECT event has not arrived yet, so a burst of
connects cannot all pass before the first event is back. A grant the broker never turned into a
connection (the client gave up) expires after :data:`GRANT_TTL_S`. A DISCONNECT leaves a
tombstone for :data:`TOMBSTONE_TTL_S`, so an event or a listing that arrives after it (the two
event subscriptions are not ordered with each other) cannot bring a closed connection back.

In a cluster, connections are on several servers at once: each is counted under its own
server's id, and a tenant's count is the sum. A server that restarts keeps its name and takes a
new id: a request or an event from a known name with a new id drops the old id's connections (a
server without a configured name is known by its id only; the listing after a reconnect, or
the one a new id triggers, drops what is gone).

Several replicas each count from the same events but see only their own grants, so two of them
admitting at the same moment can let a tenant past its limit. The broker's CONNECT events come
in one order to every replica: the replica whose grant arrives while the tenant already has its
limit open is told so by :meth:`TenantConnections.connected`, and closes that connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from contracts.tenants import is_tenant_id

# Longer than the broker's authorization timeout (2 s): by then a grant became a connection or never will.
GRANT_TTL_S = 10.0
# Longer than any reordering between the two event subscriptions, or than one rebuild's listing.
TOMBSTONE_TTL_S = 60.0

Key = tuple[str, int]  # (server id, client id)


def tenant_of_user(user: str) -> str | None:
    """The tenant of a connection, from the user name the auth callout gave it (``<tenant>/<sub>``,
    ``services/auth/callout.py``); ``None`` for anything else (service users have no ``/``)."""
    tenant, slash, _ = user.partition("/")
    return tenant if slash and is_tenant_id(tenant) else None


@dataclass(frozen=True)
class Grant:
    tenant: str
    expires: float
    limit: int  # the tenant's limit when granted


def _add(counts: dict[str, int], tenant: str, change: int) -> None:
    count = counts.get(tenant, 0) + change
    if count > 0:
        counts[tenant] = count
    else:
        counts.pop(tenant, None)


class TenantConnections:
    """Every tenant's open and granted connections, as one replica of the auth service knows them."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.servers: set[str] = set()  # the ids of the servers counted
        self._names: dict[str, str] = {}  # a server's name -> its id now
        self._open: dict[Key, str] = {}
        self._open_counts: dict[str, int] = {}
        self._granted: dict[Key, Grant] = {}  # in grant order, so the expired are at the front
        self._granted_counts: dict[str, int] = {}
        self._closed: dict[Key, float] = {}  # tombstones, in order of expiry

    def count(self, tenant: str) -> int:
        """The tenant's open connections and this replica's grants still on their way."""
        self._expire_grants()
        return self._open_counts.get(tenant, 0) + self._granted_counts.get(tenant, 0)

    def open_count(self, tenant: str) -> int:
        return self._open_counts.get(tenant, 0)

    def admit(self, tenant: str, key: Key, limit: int) -> bool:
        """Whether ``tenant`` may open the connection ``key``; if so it counts from now on."""
        if key in self._open or key in self._granted:
            return True  # the same connection asked again: already counted
        if self.count(tenant) >= limit:
            return False
        self._granted[key] = Grant(tenant, self.clock() + GRANT_TTL_S, limit)
        _add(self._granted_counts, tenant, 1)
        return True

    def connected(self, key: Key, user: str) -> Grant | None:
        """A CONNECT event. Returns this replica's grant of the connection when it finds the
        tenant's limit already open (another replica admitted at the same moment): this replica
        should then close it. It no longer counts."""
        tenant = tenant_of_user(user)
        if tenant is None or key in self._closed or key in self._open:
            return None
        grant = self._granted.pop(key, None)
        if grant is not None:
            _add(self._granted_counts, grant.tenant, -1)
            if self.open_count(tenant) >= grant.limit:
                self.disconnected(key)  # closing: other replicas count it until its DISCONNECT
                return grant
        self._open[key] = tenant
        _add(self._open_counts, tenant, 1)
        return None

    def disconnected(self, key: Key) -> None:
        """A DISCONNECT event: the connection's slot is free."""
        now = self.clock()
        while self._closed:  # tombstones expire in insertion order
            first, expiry = next(iter(self._closed.items()))
            if expiry > now:
                break
            del self._closed[first]
        self._closed[key] = now + TOMBSTONE_TTL_S
        tenant = self._open.pop(key, None)
        if tenant is not None:
            _add(self._open_counts, tenant, -1)
        grant = self._granted.pop(key, None)
        if grant is not None:
            _add(self._granted_counts, grant.tenant, -1)

    def rebuilt(self, listings: dict[str, Iterable[tuple[int, str]]]) -> None:
        """Replace the open connections with the servers' listings (server id -> ``(cid, user)``
        pairs): a server that is not listed has gone, and its connections with it. Grants stay
        (their CONNECT may still come); tombstoned connections stay closed."""
        self._open, self._open_counts = {}, {}
        self.servers = set(listings)
        for server, listed in listings.items():
            for cid, user in listed:
                key = (server, cid)
                tenant = tenant_of_user(user)
                if tenant is None or key in self._closed or key in self._open:
                    continue
                grant = self._granted.pop(key, None)
                if grant is not None:
                    _add(self._granted_counts, grant.tenant, -1)
                self._open[key] = tenant
                _add(self._open_counts, tenant, 1)

    def saw_server(self, server: str, name: str = "") -> bool:
        """A request or an event from server ``server`` (its id) named ``name``. Returns True if
        this id was not counted yet (the caller lists the connections again). A known name with
        a new id is a server that restarted: every connection of its old id went with it."""
        if name and name != server:
            old = self._names.get(name)
            self._names[name] = server
            if old is not None and old != server:
                self._drop_server(old)
        if server in self.servers:
            return False
        self.servers.add(server)
        return True

    def _drop_server(self, server: str) -> None:
        self.servers.discard(server)
        for key in [key for key in self._open if key[0] == server]:
            _add(self._open_counts, self._open.pop(key), -1)
        for key in [key for key in self._granted if key[0] == server]:
            _add(self._granted_counts, self._granted.pop(key).tenant, -1)

    def _expire_grants(self) -> None:
        now = self.clock()
        while self._granted:
            key, grant = next(iter(self._granted.items()))
            if grant.expires > now:
                return
            del self._granted[key]
            _add(self._granted_counts, grant.tenant, -1)
