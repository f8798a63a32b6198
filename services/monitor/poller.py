"""Reading every replica's statistics over the bus, once a second, into the view.

One request on ``corral.stats.<service>`` reaches every replica (no queue group), so it is a
publish with a reply inbox and the answers are collected for a short window. Pages are read
with each replica's own ``next`` cursor: a follow-up request (``after`` = that cursor) is answered
by every replica, and each one's answer is taken only while that is its cursor.

Readings are incremental: the request's ``since`` names, per replica, the generation of the last
complete reading (with the replica's ``started``), and a replica answers only the tenants that
changed since (``docs/statistics.md``); follow-up pages name the first page's ``until``. A replica
not read in full yet, restarted (a new id or ``started``), forgotten by the view, or that does not
know ``since`` (its reply has no ``generation``) is read in full.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nats.aio.client import Client

from contracts import subjects
from services.monitor.view import View

# After the first answer to a first page, how long without another before all replicas are in.
QUIET_S = 0.05
MAX_PAGES = 100  # per replica and second: 100,000 tenants at the largest page


class StatsPoller:
    def __init__(self, nc: Client, view: View, services: tuple[str, ...], *, window_s: float, log: Any) -> None:
        self.nc, self.view, self.services, self.window_s, self.log = nc, view, services, window_s, log
        self._inbox_prefix = nc._inbox_prefix.decode() if isinstance(nc._inbox_prefix, bytes) else nc._inbox_prefix
        # service -> replica -> {"started", "generation"} of its last complete reading
        self._since: dict[str, dict[str, dict[str, Any]]] = {}

    async def poll(self) -> None:
        """Read every service's replicas once, then close the second."""
        await asyncio.gather(*(self._service(name) for name in self.services))
        self.view.end_tick()

    async def _service(self, service: str) -> None:
        pending: dict[str, str | None] = {}  # replica -> cursor of its next page
        walks: dict[str, dict[str, Any]] = {}  # replica -> its reading's since/until, for follow-ups
        known = {r: s for r, s in self._since.get(service, {}).items() if self.view.remembers(r)}
        first = True
        for _ in range(MAX_PAGES):
            cursors = {None} if first else set(pending.values())
            if not cursors:
                break
            for cursor in cursors:
                expect = None if first else {r for r, c in pending.items() if c == cursor}
                body: dict[str, Any] = {"since": known} if cursor is None else {"after": cursor}
                if cursor is not None and (follow := {r: walks[r] for r in expect or () if r in walks}):
                    body["since"] = follow
                for reply in await self._ask(service, body, expect):
                    replica = str(reply.get("id", ""))
                    if "endpoints" not in reply or (not first and pending.get(replica, "") != cursor):
                        continue
                    self.view.ingest(service, reply)
                    until = reply.get("generation")
                    if first and isinstance(until, int) and isinstance(reply.get("started"), str):
                        walks[replica] = {"started": reply["started"], "generation": reply.get("since"), "until": until}
                    if reply.get("next"):
                        pending[replica] = reply["next"]
                    else:
                        pending.pop(replica, None)
                        if (walk := walks.get(replica)) is not None:  # read to the end: the next is since here
                            known[replica] = {"started": walk["started"], "generation": walk["until"]}
            first = False
        self._since[service] = known  # a replica that missed this poll: since its last reading still

    async def _ask(self, service: str, body: dict[str, Any], expect: set[str] | None) -> list[dict[str, Any]]:
        """Publish one statistics request and collect the replies: until every replica in
        ``expect`` has answered, else until ``QUIET_S`` passes without another answer (at most
        the window either way)."""
        inbox = self.nc.new_inbox()
        replies: list[dict[str, Any]] = []
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(subjects.stats(service), json.dumps(body).encode(), reply=inbox)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.window_s
            waiting = set(expect or ())
            while (left := deadline - loop.time()) > 0:
                if replies and expect is None:
                    left = min(left, QUIET_S)
                try:
                    msg = await sub.next_msg(timeout=left)
                except TimeoutError:
                    break
                except Exception:  # nats' own timeout, or the connection closing
                    break
                if not msg.data:  # a no-responders status: the service is not running
                    break
                try:
                    reply = json.loads(msg.data)
                except ValueError:
                    self.log.warning("monitor_stats_unreadable", service=service)
                    continue
                if isinstance(reply, dict):
                    replies.append(reply)
                    waiting.discard(str(reply.get("id", "")))
                    if expect is not None and not waiting:
                        break
        finally:
            await sub.unsubscribe()
        return replies
