"""Counting each tenant's connections (services/auth/connections.py): grants, the broker's events,
its listing, a restarted broker and several replicas, with no broker and a clock of our own."""

from __future__ import annotations

import asyncio
import json

import pytest

from contracts import subjects
from services.auth import broker_connections
from services.auth.connections import GRANT_TTL_S, TenantConnections, tenant_of_user
from services.auth.denials import DenialAudit
from services.auth.departures import Departures

SERVER = "NSERVER"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def counts(clock: Clock) -> TenantConnections:
    return TenantConnections(clock)


def open_connections(counts: TenantConnections, tenant: str, cids: range, limit: int = 3) -> None:
    for cid in cids:
        assert counts.admit(tenant, (SERVER, cid), limit)
        assert counts.connected((SERVER, cid), f"{tenant}/alice") is None


def test_a_tenant_is_admitted_up_to_its_limit_and_refused_past_it(counts):
    open_connections(counts, "acme", range(1, 4))
    assert counts.count("acme") == 3
    assert not counts.admit("acme", (SERVER, 4), 3)
    assert counts.admit("globex", (SERVER, 5), 3)  # another tenant's count is its own


def test_grants_on_their_way_count_so_a_burst_cannot_pass_before_the_first_event(counts):
    assert [counts.admit("acme", (SERVER, cid), 3) for cid in range(1, 6)] == [True, True, True, False, False]


def test_a_connect_event_confirms_its_grant_without_counting_it_twice(counts):
    assert counts.admit("acme", (SERVER, 1), 3)
    counts.connected((SERVER, 1), "acme/alice")
    assert (counts.count("acme"), counts.open_count("acme")) == (1, 1)


def test_a_disconnect_frees_the_slot(counts):
    open_connections(counts, "acme", range(1, 4))
    counts.disconnected((SERVER, 2))
    assert counts.count("acme") == 2
    assert counts.admit("acme", (SERVER, 9), 3)


def test_a_grant_the_broker_never_turned_into_a_connection_expires(counts, clock):
    assert counts.admit("acme", (SERVER, 1), 1)
    assert not counts.admit("acme", (SERVER, 2), 1)
    clock.now += GRANT_TTL_S + 0.1
    assert counts.admit("acme", (SERVER, 2), 1)


def test_a_disconnect_seen_before_its_connect_leaves_no_phantom_connection(counts):
    assert counts.admit("acme", (SERVER, 1), 3)
    counts.disconnected((SERVER, 1))  # the two event subscriptions are not ordered with each other
    counts.connected((SERVER, 1), "acme/alice")
    assert counts.count("acme") == 0


def test_service_users_and_unknown_names_are_not_counted():
    assert [tenant_of_user(user) for user in ("router", "auth-audit", "", "acme/alice", "a.b/x", "acme/x/y")] == [
        None,
        None,
        None,
        "acme",
        None,
        "acme",
    ]


def test_a_rebuild_replaces_the_open_connections_and_keeps_grants_still_on_their_way(counts):
    open_connections(counts, "acme", range(1, 3))
    assert counts.admit("acme", (SERVER, 7), 5)  # granted, its CONNECT not seen yet
    assert counts.admit("acme", (SERVER, 8), 5)  # granted, and already in the listing
    counts.disconnected((SERVER, 5))
    counts.rebuilt({SERVER: [(1, "acme/alice"), (5, "acme/bob"), (8, "acme/carol"), (9, "router")]})
    # 2 closed while nobody watched, 5 was seen closing, 9 is a service: 1 and 8 open, 7 granted.
    assert (counts.open_count("acme"), counts.count("acme")) == (2, 3)


def test_a_restarted_server_keeps_its_name_and_its_old_ids_connections_no_longer_count(counts):
    counts.saw_server(SERVER, "n1")
    open_connections(counts, "acme", range(1, 4))
    assert not counts.admit("acme", ("NRESTARTED", 1), 3)  # not known to be the same server yet
    assert counts.saw_server("NRESTARTED", "n1")  # its request names it: a new id, list again
    assert counts.admit("acme", ("NRESTARTED", 1), 3)
    assert counts.count("acme") == 1


def test_a_tenants_connections_on_every_server_of_a_cluster_count_together(counts):
    for server, name in (("NA", "n0"), ("NB", "n1"), ("NC", "n2")):
        assert counts.saw_server(server, name)
    assert counts.admit("acme", ("NA", 1), 3) and counts.admit("acme", ("NB", 1), 3)  # the same cid elsewhere
    assert counts.admit("acme", ("NC", 7), 3)
    assert not counts.admit("acme", ("NA", 2), 3)
    counts.disconnected(("NB", 1))
    assert counts.admit("acme", ("NA", 2), 3)


def test_a_rebuild_drops_the_connections_of_a_server_that_no_longer_answers(counts):
    counts.rebuilt({"NA": [(1, "acme/a"), (2, "acme/b")], "NB": [(1, "acme/c")]})
    assert counts.open_count("acme") == 3 and counts.servers == {"NA", "NB"}
    counts.rebuilt({"NA": [(1, "acme/a"), (2, "acme/b")]})  # NB went (an unnamed broker restarted)
    assert counts.open_count("acme") == 2 and not counts.saw_server("NA")


def test_two_replicas_admitting_at_once_close_the_one_that_arrives_past_the_limit(clock):
    """Each replica sees only its own grants: both admit the tenant's third connection. The
    broker's CONNECT events come in one order to both, and only the replica whose grant arrives
    with the limit already open closes it."""
    first, second = TenantConnections(clock), TenantConnections(clock)
    for replica in (first, second):
        for cid in (1, 2):
            replica.connected((SERVER, cid), "acme/alice")
    assert first.admit("acme", (SERVER, 3), 3) and second.admit("acme", (SERVER, 4), 3)
    verdicts = {}
    for replica, name in ((first, "first"), (second, "second")):
        verdicts[name] = [replica.connected((SERVER, cid), "acme/alice") for cid in (3, 4)]
    assert verdicts["first"] == [None, None]  # 4 is not its grant: not its to close
    assert verdicts["second"][0] is None and verdicts["second"][1].tenant == "acme"
    assert second.open_count("acme") == 3
    first.disconnected((SERVER, 4))  # the kick's DISCONNECT
    assert first.open_count("acme") == 3


def test_a_replica_alone_never_closes_what_it_admitted(counts):
    for cid in range(1, 4):
        assert counts.admit("acme", (SERVER, cid), 3)
    assert [counts.connected((SERVER, cid), "acme/alice") for cid in range(1, 4)] == [None, None, None]


class ChurningBroker:
    """CONNZ listings in pages sorted by client id, one per server of a cluster, where
    connections close between pages."""

    def __init__(self, cids: list[int], closes_per_page: int, servers: tuple[str, ...] = (SERVER,)) -> None:
        self.open = {server: list(cids) for server in servers}
        self.closes_per_page = closes_per_page
        self.pages = 0

    async def pages_of(self, offset: int, **_: object) -> dict:
        from services.auth import broker_connections

        if self.pages:  # between two pages, the lowest open connections close
            for still in self.open.values():
                del still[: self.closes_per_page]
        self.pages += 1
        answers = {}
        for server, still in self.open.items():
            listed = still[offset : offset + broker_connections.PAGE]
            answers[server] = {
                "server": {"id": server},
                "data": {
                    "total": len(still),
                    "connections": [{"cid": cid, "authorized_user": f"acme/{cid}"} for cid in listed],
                },
            }
        return answers


@pytest.mark.parametrize("closes_per_page", [0, 1, 5, 40])
async def test_the_paged_listing_misses_no_connection_open_throughout_though_others_close(monkeypatch, closes_per_page):
    """Closures before the current page move every later connection forward; a listing that
    only stepped on by a page would skip them, and the tenant would be under-counted."""
    from services.auth import broker_connections

    monkeypatch.setattr(broker_connections, "PAGE", 10)
    monkeypatch.setattr(broker_connections, "OVERLAP", 2)
    broker = ChurningBroker(list(range(1, 301)), closes_per_page, servers=("NA", "NB"))
    del broker.open["NB"][150:]  # the second server holds fewer: its listing ends sooner
    watcher = broker_connections.BrokerConnections("nats://unused", "auth-system", "x", log=None)
    monkeypatch.setattr(watcher, "_pages", broker.pages_of)
    listed = await watcher._listing()
    assert set(listed) == {"NA", "NB"}
    for server, still in broker.open.items():
        assert set(still) <= set(listed[server])  # what is still open was listed, on each server


class Event:
    """A broker CONNECT/DISCONNECT event message, as BrokerConnections reads it."""

    def __init__(self, user: str, cid: int) -> None:
        body = {"server": {"id": SERVER, "name": "n1"}, "client": {"id": cid, "user": user, "name": "x"}}
        self.data = json.dumps(body).encode()
        self.subject = "$SYS.ACCOUNT.APP.DISCONNECT"


def test_a_service_users_closed_connection_is_a_departure_and_a_tenants_is_not():
    gone: list[str] = []
    watcher = broker_connections.BrokerConnections(
        "nats://unused", "auth-system", "x", log=None, departures=gone.append
    )
    watcher.counts.saw_server(SERVER, "n1")  # (no rebuild: this server is known)
    watcher._event(True, Event("graph", 1))  # a connect is no departure
    watcher._event(False, Event("acme/alice", 2))  # a tenant's connection: counted, not a departure
    watcher._event(False, Event("graph", 1))
    watcher._held = []  # during a rebuild the counts wait; the departure does not
    watcher._event(False, Event("workflow", 3))
    assert gone == ["graph", "workflow"]


async def test_a_departure_of_a_service_is_announced_on_its_leaving_subject():
    published: list[tuple[str, bytes]] = []

    class Connection:
        is_connected = True

        async def publish(self, subject: str, data: bytes) -> None:
            published.append((subject, data))

    class Log:
        def debug(self, *args: object, **kwargs: object) -> None: ...

        def warning(self, *args: object, **kwargs: object) -> None: ...

    denials = DenialAudit("nats://unused", "auth-audit", "x", Log())
    denials.nc = Connection()
    tasks: list[asyncio.Task[None]] = []
    departures = Departures(denials, Log(), tasks.append)
    departures("graph")
    departures("not a name.>")  # no subject of it: nothing sent
    await asyncio.gather(*tasks)
    assert published == [(subjects.leaving("graph"), b"")]
