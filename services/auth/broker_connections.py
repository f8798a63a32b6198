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

The same events tell when a service replica's connection closes. A replica that stops says it is
leaving first (``corral.leaving.<service>``, services/runtime/liveness.py), but one killed with
SIGKILL says nothing, and the router would go on passing runs on to it until its next probe
(up to a second), each to wait out its client's deadline. So the closing of a service user's
connection is handed to ``departures`` (the auth service announces it on the service's leaving
subject, services/auth/__main__.py): the router probes again at once.

The count is rebuilt from the broker's listing at start (before the callout is served, so a
restarted replica refuses what it should from its first answer) and after each reconnect of this
connection (events were missed). Events that arrive during a rebuild are held and applied after
it. The listing comes in pages sorted by client id; a page that does not start at or before the
last client id of the page before means connections closed in between and moved the rest
forward, so the listing steps back rather than miss one.

In a cluster every server answers the account's listing with its own connections, and sends
the events of its own: each page is gathered from every server (those seen before, or until no
other answers for a moment), each server's connections counted under its id, and a server not
seen before, in an event or an authorization request, makes the count list again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import nats
from nats.aio.msg import Msg

from contracts import subjects
from contracts.errors import Unavailable
from services.auth.connections import Grant, Key, TenantConnections, tenant_of_user
from services.auth.denials import DenialAudit
from services.auth.errors import ConnectionLimitReached, InvalidCalloutRequest, SubscriptionLimitReached
from services.auth.manifest import CLOSE_CONNECTION, CONNECT_EVENTS, DISCONNECT_EVENTS, LIST_CONNECTIONS
from services.runtime.connection import quick_reconnects

PAGE = 512  # connections per listing page: about 300 KB of JSON
SWEEP_PAGE = 64  # connections per page of the subscription sweep (most subscriptions first)
OVERLAP = 16  # each page starts this many connections before the previous one ended
REQUEST_TIMEOUT_S = 5.0
# How long a listing waits, after the last server's answer, for another server's (a cluster).
GATHER_S = 0.5


class BrokerConnections:
    def __init__(
        self,
        url: str,
        user: str,
        password: str,
        log: Any,
        denials: DenialAudit | None = None,
        departures: Callable[[str], None] | None = None,
    ) -> None:
        """``departures``: called with the user name of every connection that closes and is not
        a tenant's (a service's, by its user name)."""
        self.url, self.user, self.password, self.log, self.denials = url, user, password, log, denials
        self.departures = departures
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
        (each server's listing, most subscriptions first, stops at the first connection within
        it). Every server of a cluster answers each page with its own connections."""
        closed, offset = 0, 0
        going: set[str] | None = None  # the servers whose listing goes on (None: not known yet)
        while going is None or going:
            pages = await self._pages(offset, sort="subs", limit=SWEEP_PAGE, expected=going)
            going = set(pages) if going is None else going & set(pages)
            for server, body in pages.items():
                if server not in going:
                    continue
                connections = body["data"].get("connections") or []
                for connection in connections:
                    held = int(connection.get("subscriptions") or 0)
                    if held <= lowest:
                        going.discard(server)
                        break
                    closed += await self._enforce(server, connection, held, limit_of)
                if len(connections) < SWEEP_PAGE:
                    going.discard(server)
            offset += SWEEP_PAGE  # a connection closing meanwhile can only move one sooner
        return closed

    async def _enforce(self, server: str, connection: dict[str, Any], held: int, limit_of: Callable[[str], int]) -> int:
        """Close ``connection`` (on ``server``) if its tenant allows fewer than ``held`` subscriptions."""
        tenant, slash, _ = str(connection.get("authorized_user") or "").partition("/")
        if not slash:
            return 0  # a service's own user, not a tenant's
        limit = limit_of(tenant)
        if held <= limit or not await self._kick(server, int(connection["cid"])):
            return 0
        error = SubscriptionLimitReached(tenant, held, limit)
        client = str(connection.get("name") or "")[:64]
        self.log.warning("auth_denied", reason=error.message, client=client, tenant_id=tenant)
        if self.denials is not None:
            self.denials.record(error, client)
        return 1

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

    def admit(self, tenant: str, server: str, cid: int, limit: int, server_name: str = "") -> None:
        """Count the connection ``cid`` on ``server`` for ``tenant``, or refuse it past ``limit``."""
        if cid <= 0:  # every nats-server since 2.10 sends it; without it nothing could be counted
            raise InvalidCalloutRequest("the authorization request names no client id")
        self._saw(server, server_name)
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
            name = str(event["server"].get("name") or "")
            user = str(client.get("user") or "")
        except (ValueError, KeyError, TypeError, AttributeError):
            self.log.warning("auth_connection_event_unreadable", subject=msg.subject)
            return
        self._saw(key[0], name)
        if not connected and self.departures is not None and user and tenant_of_user(user) is None:
            self.departures(user)  # at once, not after a rebuild: the router waits for nothing else
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

    def _saw(self, server: str, name: str) -> None:
        """A server not counted yet (a cluster node, or the broker after a restart): list again."""
        if self.counts.saw_server(server, name):
            self._spawn(self._rebuild_logged())

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
        listings: dict[str, dict[int, str]] | None = None
        try:
            listings = await self._listing()
        finally:
            held, self._held = self._held, None
            if listings is not None:
                self.counts.rebuilt({server: listed.items() for server, listed in listings.items()})
            for connected, key, user in held:
                self._apply(connected, key, user)
        counted = sum(len(listed) for listed in listings.values())
        self.log.info("auth_connections_counted", connections=counted, servers=sorted(listings))

    async def _listing(self) -> dict[str, dict[int, str]]:
        """Every open connection of APP on every server that answers: server id -> client id ->
        user name. Each server pages its own listing; the pages are asked of all at once."""
        listed: dict[str, dict[int, str]] = {}
        last: dict[str, int] = {}
        going: set[str] | None = None  # servers with more to list (None: not known yet)
        offset, pages, budget = 0, 0, 8
        while pages < budget:
            pages += 1
            expected = going if going is not None else (self.counts.servers or None)
            answers = await self._pages(offset, expected=expected)
            if going is None:
                going = set(answers)
                listed = {server: {} for server in answers}
            for server in going - answers.keys():  # it left the cluster (or restarted) meanwhile
                going.discard(server)
                listed.pop(server, None)
            step_back = False
            for server, body in answers.items():
                if server not in going:
                    continue
                data = body["data"]
                connections = data.get("connections") or []
                if offset > 0 and (not connections or int(connections[0]["cid"]) > last[server]):
                    step_back = True  # connections before this page closed: this server steps back
                    continue
                for connection in connections:
                    listed[server][int(connection["cid"])] = str(connection.get("authorized_user") or "")
                if len(connections) < PAGE:
                    going.discard(server)
                else:
                    last[server] = int(connections[-1]["cid"])
                budget = max(budget, 2 * int(data.get("total") or 0) // (PAGE - OVERLAP) + 8)
            if not going:
                return listed
            offset = max(0, offset - PAGE // 2) if step_back else offset + PAGE - OVERLAP
        raise Unavailable("the broker's connection listing kept changing; not counted")

    async def _pages(
        self, offset: int, *, sort: str | None = None, limit: int = PAGE, expected: set[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """One page of APP's connections from every server: server id -> its answer. Every server
        of a cluster answers an account's listing; the answers are gathered until those of
        ``expected`` are in (else as many as the cluster has nodes), or for :data:`GATHER_S`
        after the last one (a node that does not answer)."""
        request: dict[str, Any] = {"offset": offset, "limit": limit, "auth": True}  # auth: with user names
        if sort is not None:
            request["sort"] = sort
        answers: dict[str, dict[str, Any]] = {}
        errors: list[str] = []
        arrived = asyncio.Event()

        async def on_answer(msg: Msg) -> None:
            try:
                body = json.loads(msg.data)
                if body.get("error"):
                    errors.append(str(body["error"]))
                else:
                    answers[str(body["server"]["id"])] = body
            except (ValueError, KeyError, TypeError, AttributeError):
                errors.append("an unreadable answer")
            arrived.set()

        inbox = self.nc.new_inbox()
        subscription = await self.nc.subscribe(inbox, cb=on_answer)
        try:
            await self.nc.publish(LIST_CONNECTIONS, json.dumps(request).encode(), reply=inbox)
            until = time.monotonic() + REQUEST_TIMEOUT_S
            nodes = self._nodes()
            while not ((expected and expected <= answers.keys()) or (expected is None and len(answers) >= nodes)):
                wait = REQUEST_TIMEOUT_S if not answers and not errors else GATHER_S
                arrived.clear()
                try:
                    async with asyncio.timeout(max(0.0, min(wait, until - time.monotonic()))):
                        await arrived.wait()
                except TimeoutError:
                    break
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        if not answers:
            reason = errors[0] if errors else "no answer"
            raise Unavailable(f"the broker did not list its connections: {reason}")
        return answers

    def _nodes(self) -> int:
        """How many servers the broker says its cluster has (the client URLs its INFO
        advertises, its own included; none: it is alone)."""
        info = getattr(self.nc, "_server_info", None) or {}
        return max(1, len(info.get("connect_urls") or ()))

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # a reference until it is done (the loop keeps only weak ones)
        task.add_done_callback(self._tasks.discard)
