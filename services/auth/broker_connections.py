"""The tenants' connections as the broker reports them, through its system account.

The auth service keeps a third connection, as the system-account user ``auth-system``, which may
only read APP's CONNECT and DISCONNECT events, list APP's connections (CONNZ) and close one
connection (KICK). Every replica follows every event, so each knows every tenant's open
connections; the callout admits a connection while its tenant is under its limit
(:class:`~services.auth.connections.TenantConnections`).

The same connection enforces each tenant's ``connection.max_subscriptions``, which the broker
does not apply to callout-issued users (nats-server issue 5002): every few seconds it lists APP's
connections by number of subscriptions, most first, and closes each tenant connection past its
tenant's limit (it stops at the first connection within the lowest limit, so a sweep reads one
short page however many connections are open).

The count is rebuilt from the broker's listing at start (before the callout is served, so a
restarted replica refuses what it should from its first answer) and after each reconnect of this
connection (events were missed). Events that arrive during a rebuild are held and applied after
it. The listing comes in pages sorted by client id; a page that does not start at or before the
last client id of the page before means connections closed in between and moved the rest
forward, so the listing steps back rather than miss one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import nats
from nats.aio.msg import Msg

from contracts import subjects
from contracts.errors import Unavailable
from services.auth.connections import Grant, Key, TenantConnections
from services.auth.denials import DenialAudit
from services.auth.errors import ConnectionLimitReached, InvalidCalloutRequest, SubscriptionLimitReached
from services.auth.manifest import CLOSE_CONNECTION, CONNECT_EVENTS, DISCONNECT_EVENTS, LIST_CONNECTIONS
from services.runtime.connection import quick_reconnects

PAGE = 512  # connections per listing page: about 300 KB of JSON
SWEEP_PAGE = 64  # connections per page of the subscription sweep (most subscriptions first)
OVERLAP = 16  # each page starts this many connections before the previous one ended
REQUEST_TIMEOUT_S = 5.0


class BrokerConnections:
    def __init__(self, url: str, user: str, password: str, log: Any, denials: DenialAudit | None = None) -> None:
        self.url, self.user, self.password, self.log, self.denials = url, user, password, log, denials
        self.counts = TenantConnections(time.monotonic)
        self.nc: Any = None
        self._held: list[tuple[bool, Key, str]] | None = None  # events during a rebuild
        self._rebuilding: asyncio.Task[None] | None = None
        self._again = False
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Connect, follow the events, then list the connections already open."""
        self.nc = await nats.connect(
            self.url,
            user=self.user,
            password=self.password,
            name="corral-auth-system",
            inbox_prefix=subjects.service_inbox_prefix(self.user).encode(),
            max_reconnect_attempts=-1,
            reconnect_to_server_handler=quick_reconnects(first_s=0.0, most_s=1.0),
            reconnected_cb=self._reconnected,
        )
        await self.nc.subscribe(CONNECT_EVENTS, cb=self._on_connect)
        await self.nc.subscribe(DISCONNECT_EVENTS, cb=self._on_disconnect)
        # A single flush can overtake queued SUBs (NATS-NOTES.md): the second follows them.
        await self.nc.flush()
        await self.nc.flush()
        await self.rebuild()

    def sweep_every(self, interval_s: float, limit_of: Callable[[str], int], lowest: Callable[[], int]) -> None:
        """Close tenant connections past their tenant's subscription limit every ``interval_s``
        (see :meth:`sweep`); a failed sweep is logged and the next one tries again."""

        async def sweeping() -> None:
            while True:
                await asyncio.sleep(interval_s)  # a period, not a synchronisation
                try:
                    await self.sweep(limit_of, lowest())
                except Exception as exc:
                    self.log.warning("auth_subscriptions_not_swept", error=repr(exc))

        self._spawn(sweeping())

    async def sweep(self, limit_of: Callable[[str], int], lowest: int) -> int:
        """One sweep: close every tenant connection holding more subscriptions than ``limit_of``
        its tenant allows; returns how many it closed. ``lowest``: the lowest limit of any tenant
        (the listing, most subscriptions first, stops at the first connection within it)."""
        closed, offset = 0, 0
        while True:
            body = await self._page(offset, sort="subs", limit=SWEEP_PAGE)
            server, connections = str(body["server"]["id"]), body["data"].get("connections") or []
            for connection in connections:
                held = int(connection.get("subscriptions") or 0)
                if held <= lowest:
                    return closed
                tenant, slash, _ = str(connection.get("authorized_user") or "").partition("/")
                if not slash:
                    continue  # a service's own user, not a tenant's
                limit = limit_of(tenant)
                if held > limit and await self._kick(server, int(connection["cid"])):
                    closed += 1
                    error = SubscriptionLimitReached(tenant, held, limit)
                    client = str(connection.get("name") or "")[:64]
                    self.log.warning("auth_denied", reason=error.message, client=client, tenant_id=tenant)
                    if self.denials is not None:
                        self.denials.record(error, client)
            if len(connections) < SWEEP_PAGE:
                return closed
            offset += len(connections)  # a connection closing meanwhile can only move one sooner

    async def _kick(self, server: str, cid: int) -> bool:
        reply = await self.nc.request(
            CLOSE_CONNECTION.format(server=server), json.dumps({"cid": cid}).encode(), timeout=REQUEST_TIMEOUT_S
        )
        return not json.loads(reply.data).get("error")  # else closed already (another replica's sweep)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.nc is not None:
            await self.nc.drain()

    def admit(self, tenant: str, server: str, cid: int, limit: int) -> None:
        """Count the connection ``cid`` on ``server`` for ``tenant``, or refuse it past ``limit``."""
        if cid <= 0:  # every nats-server since 2.10 sends it; without it nothing could be counted
            raise InvalidCalloutRequest("the authorization request names no client id")
        if not self.counts.admit(tenant, (server, cid), limit):
            raise ConnectionLimitReached(tenant, limit)

    # ---- events --------------------------------------------------------------------

    async def _on_connect(self, msg: Msg) -> None:
        self._event(True, msg)

    async def _on_disconnect(self, msg: Msg) -> None:
        self._event(False, msg)

    def _event(self, connected: bool, msg: Msg) -> None:
        try:
            event = json.loads(msg.data)
            client = event["client"]
            key = (str(event["server"]["id"]), int(client["id"]))
            user = str(client.get("user") or "")
        except (ValueError, KeyError, TypeError):
            self.log.warning("auth_connection_event_unreadable", subject=msg.subject)
            return
        if self._held is not None:
            self._held.append((connected, key, user))
        else:
            self._apply(connected, key, user, str(client.get("name") or "")[:64])

    def _apply(self, connected: bool, key: Key, user: str, client: str = "") -> None:
        if not connected:
            self.counts.disconnected(key)
            return
        grant = self.counts.connected(key, user)
        if grant is not None:
            self._spawn(self._close(key, grant, client))

    async def _close(self, key: Key, grant: Grant, client: str) -> None:
        """Close a connection this replica admitted while another replica admitted the tenant's
        last one: the broker's events put it past the limit."""
        error = ConnectionLimitReached(grant.tenant, grant.limit, closed=True)
        server, cid = key
        try:
            await self.nc.request(
                CLOSE_CONNECTION.format(server=server), json.dumps({"cid": cid}).encode(), timeout=REQUEST_TIMEOUT_S
            )
        except Exception as exc:  # it stays open, counted by the other replicas (no longer by this one)
            self.log.warning("auth_connection_not_closed", tenant_id=grant.tenant, cid=cid, error=repr(exc))
            return
        self.log.warning("auth_denied", reason=error.message, client=client, tenant_id=grant.tenant)
        if self.denials is not None:
            self.denials.record(error, client)

    # ---- rebuilding the count from the broker's listing --------------------------------

    async def _reconnected(self) -> None:
        """Events were missed while this connection was down (or the broker restarted)."""
        self._spawn(self._rebuild_logged())

    async def _rebuild_logged(self) -> None:
        try:
            await self.rebuild()
        except Exception as exc:  # counting goes on from the events; the next reconnect tries again
            self.log.warning("auth_connections_not_rebuilt", error=repr(exc))

    async def rebuild(self) -> None:
        """Count from the broker's listing of APP's connections. A call during a rebuild makes
        it list once more when done (what it listed may predate the reason for this call)."""
        if self._rebuilding is None or self._rebuilding.done():
            self._again = True
            self._rebuilding = asyncio.get_running_loop().create_task(self._rebuild_until_settled())
        else:
            self._again = True
        await asyncio.shield(self._rebuilding)

    async def _rebuild_until_settled(self) -> None:
        while self._again:
            self._again = False
            await self._rebuild()

    async def _rebuild(self) -> None:
        self._held = []
        listing: tuple[str, dict[int, str]] | None = None
        try:
            listing = await self._listing()
        finally:
            held, self._held = self._held, None
            if listing is not None:
                self.counts.rebuilt(listing[0], listing[1].items())
            for connected, key, user in held:
                self._apply(connected, key, user)
        self.log.info("auth_connections_counted", connections=len(listing[1]), server=listing[0])

    async def _listing(self) -> tuple[str, dict[int, str]]:
        """Every open connection of APP: client id -> user name, and the server's id."""
        listed: dict[int, str] = {}
        offset, last, pages, budget = 0, -1, 0, 8
        while pages < budget:
            pages += 1
            body = await self._page(offset)
            server, data = str(body["server"]["id"]), body["data"]
            connections = data.get("connections") or []
            if offset > 0 and (not connections or int(connections[0]["cid"]) > last):
                offset = max(0, offset - PAGE // 2)  # connections before this page closed: step back
                continue
            for connection in connections:
                listed[int(connection["cid"])] = str(connection.get("authorized_user") or "")
            if len(connections) < PAGE:
                return server, listed
            last = int(connections[-1]["cid"])
            offset += len(connections) - OVERLAP
            budget = max(budget, 2 * int(data.get("total") or 0) // (PAGE - OVERLAP) + 8)
        raise Unavailable("the broker's connection listing kept changing; not counted")

    async def _page(self, offset: int, *, sort: str | None = None, limit: int = PAGE) -> dict[str, Any]:
        request: dict[str, Any] = {"offset": offset, "limit": limit, "auth": True}  # auth: with user names
        if sort is not None:
            request["sort"] = sort
        reply = await self.nc.request(LIST_CONNECTIONS, json.dumps(request).encode(), timeout=REQUEST_TIMEOUT_S)
        body = json.loads(reply.data)
        if body.get("error"):
            raise Unavailable(f"the broker refused to list connections: {body['error']}")
        return body

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # a reference until it is done (the loop keeps only weak ones)
        task.add_done_callback(self._tasks.discard)
