"""The monitor's reading of the broker's /connz (services/monitor/broker.py), on recorded answers:
per tenant its open connections and subscriptions, each connection closed as a slow consumer
counted once (also after the broker's list drops it), and open connections the broker stalled
publishers on since the last reading."""

from __future__ import annotations

import httpx
import pytest

from services.monitor.broker import BrokerConnections


class FakeConnz:
    """/connz answers from lists the test changes between readings."""

    def __init__(self) -> None:
        self.open: list = []
        self.closed: list = []
        self.body: object = None  # a malformed answer, when set

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.body is not None:
            return httpx.Response(200, json=self.body)
        state = request.url.params["state"]
        return httpx.Response(200, json={"connections": self.open if state == "open" else self.closed})


def conn(cid: int, user: str, **fields) -> dict:
    return {"cid": cid, "start": f"2026-12-01T00:00:0{cid % 10}Z", "authorized_user": user, **fields}


@pytest.fixture
def connz():
    fake = FakeConnz()
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    return fake, BrokerConnections("http://broker", client=client)


async def test_open_connections_and_subscriptions_are_counted_per_tenant(connz):
    fake, broker = connz
    fake.open = [conn(1, "acme/alice", subscriptions=3), conn(2, "acme/bob", subscriptions=2), conn(3, "globex/x")]
    fake.open.append(conn(4, "router"))  # a service's user: no tenant
    assert await broker.read() == {"acme": (2, 5, 0, 0), "globex": (1, 0, 0, 0)}


async def test_a_connection_closed_as_a_slow_consumer_is_counted_once_for_its_tenant(connz):
    fake, broker = connz
    fake.closed = [
        conn(5, "acme/alice", reason="Slow Consumer (Pending Bytes)"),
        conn(6, "acme/bob", reason="Client Closed"),
        conn(7, "globex/x", reason="Read Error"),
    ]
    assert (await broker.read())["acme"][2] == 1
    fake.closed.append(conn(8, "acme/carol", reason="Slow Consumer (Write Deadline)"))
    assert (await broker.read())["acme"][2] == 2  # the first one not again
    fake.closed = [conn(9, "globex/y", reason="Client Closed")]  # the broker's list moved on
    found = await broker.read()
    assert found == {"acme": (0, 0, 2, 0)}  # still counted; globex has nothing to count


async def test_a_cid_used_again_after_a_broker_restart_is_another_connection(connz):
    fake, broker = connz
    fake.closed = [conn(5, "acme/alice", reason="Slow Consumer (Pending Bytes)")]
    await broker.read()
    again = {**conn(5, "acme/alice", reason="Slow Consumer (Pending Bytes)"), "start": "2026-12-02T00:00:00Z"}
    fake.closed = [again]
    assert (await broker.read())["acme"][2] == 2


async def test_an_open_connection_is_stalled_while_its_stalls_grow(connz):
    fake, broker = connz
    fake.open = [conn(1, "acme/alice", stalls=3), conn(2, "globex/x")]
    assert (await broker.read())["acme"][3] == 1
    assert (await broker.read())["acme"][3] == 0  # no new stall since the last reading
    fake.open = [conn(1, "acme/alice", stalls=4)]
    assert (await broker.read())["acme"][3] == 1


@pytest.mark.parametrize(
    "body", [[], "connz", {"connections": "many"}, {"connections": {"cid": 1}}], ids=["list", "str", "str2", "obj"]
)
async def test_a_malformed_answer_is_an_error_the_loop_reports_not_a_crash(connz, body):
    fake, broker = connz
    fake.body = body
    with pytest.raises(ValueError):
        await broker.read()


async def test_odd_entries_are_skipped(connz):
    fake, broker = connz
    fake.open = ["x", None, 7, conn(1, "acme/a", subscriptions="lots", stalls=[1]), {"authorized_user": "Bad Tenant/x"}]
    fake.closed = [conn(2, "acme/b", reason=None), {"cid": [1], "authorized_user": "acme/c", "reason": "Slow Consumer"}]
    assert await broker.read() == {"acme": (1, 0, 1, 0)}


async def test_no_connections_is_an_empty_reading(connz):
    fake, broker = connz
    fake.body = {"connections": None}  # nats-server writes null for none
    assert await broker.read() == {}


async def test_every_node_of_a_cluster_is_read_and_its_connections_summed_per_tenant():
    """Each node lists its own connections, with client ids of its own: the same cid on two
    nodes is two connections (and two slow consumers)."""
    nodes = {"a": FakeConnz(), "b": FakeConnz()}
    nodes["a"].open = [conn(1, "acme/alice", subscriptions=2)]
    nodes["b"].open = [conn(1, "acme/bob", subscriptions=1), conn(2, "globex/x")]
    for fake in nodes.values():
        fake.closed = [conn(3, "acme/carol", reason="Slow Consumer (Pending Bytes)")]
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: nodes[request.url.host](request)))
    broker = BrokerConnections("http://a, http://b/", client=client)
    assert broker.base_urls == ["http://a", "http://b"]
    assert await broker.read() == {"acme": (2, 3, 2, 0), "globex": (1, 0, 0, 0)}
    assert (await broker.read())["acme"][2] == 2  # each counted once
