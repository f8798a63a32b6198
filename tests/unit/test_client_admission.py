"""A client's connect the broker timed out is tried again, with backoff, up to a deadline; a token
the auth service refused fails at once with a clear error. The connection attempt itself is a
stand-in here; tests/integration/test_connection_storm.py connects thousands for real."""

from __future__ import annotations

import pytest
from nats import errors as nats_errors

from contracts.errors import TenantMismatch, Unauthorized, Unavailable
from corral import client as client_module
from corral.client import CorralClient, _admission_timed_out
from corral.nats_server import free_port
from services.auth.tokens import mint_dev_token

KEY = "dev-key-for-tests-only-0123456789abcdef"
TIMED_OUT = nats_errors.Error("nats: 'Authentication Timeout'")
REFUSED = nats_errors.Error("nats: 'Authorization Violation'")


@pytest.fixture(autouse=True)
def short_waits(monkeypatch):
    monkeypatch.setattr(client_module, "ADMISSION_FIRST_WAIT_S", 0.001)
    monkeypatch.setattr(client_module, "ADMISSION_MOST_WAIT_S", 0.002)


def attempting(*outcomes: object, **settings: float) -> CorralClient:
    """A client whose connection attempts end with ``outcomes`` in turn (an exception is raised);
    ``settings``: its admission_timeout_s and callout_timeout_s."""
    client = CorralClient(f"nats://127.0.0.1:{free_port()}", "acme", mint_dev_token("acme", key=KEY), {})
    for name, value in settings.items():
        setattr(client, name, value)
    remaining = list(outcomes)

    async def open_once():
        outcome = remaining.pop(0) if len(remaining) > 1 else remaining[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    client._open = open_once  # type: ignore[method-assign]
    return client


async def test_a_connect_the_broker_timed_out_is_tried_again_until_admitted():
    client = attempting(TIMED_OUT, TimeoutError(), "connected")
    assert await client._admitted() == "connected"
    assert client.attempts == 3


async def test_a_refused_token_fails_at_once_with_a_clear_error():
    client = attempting(REFUSED, "connected")
    with pytest.raises(Unauthorized, match="refused the token"):
        await client._admitted()
    assert client.attempts == 1


async def test_a_refusal_that_came_only_after_the_callout_timeout_is_tried_again():
    # With a callout timeout of 0 s, every refusal came after the broker stopped waiting.
    client = attempting(REFUSED, "connected", callout_timeout_s=0.0)
    assert await client._admitted() == "connected"
    assert client.attempts == 2


async def test_a_broker_that_does_not_listen_fails_at_once():
    client = attempting(ConnectionRefusedError(111, "Connection refused"), "connected")
    with pytest.raises(ConnectionRefusedError):
        await client._admitted()
    assert client.attempts == 1


async def test_a_token_of_another_tenant_is_not_tried_again():
    client = attempting(TenantMismatch("another tenant's token"), "connected")
    with pytest.raises(TenantMismatch):
        await client._admitted()
    assert client.attempts == 1


async def test_past_its_deadline_the_client_gives_up_with_unavailable():
    client = attempting(TIMED_OUT, admission_timeout_s=0.3)
    with pytest.raises(Unavailable, match=r"did not admit this connection within 0\.3 s"):
        await client._admitted()
    assert client.attempts > 1


@pytest.mark.parametrize(
    ("error", "elapsed_s", "timed_out"),
    [
        (TIMED_OUT, 0.1, True),
        (TimeoutError(), 3.0, True),
        (nats_errors.TimeoutError(), 3.0, True),
        (nats_errors.UnexpectedEOF(), 0.1, True),
        (ConnectionResetError(), 0.1, True),
        (BrokenPipeError(), 0.1, True),
        (REFUSED, 0.01, False),
        (REFUSED, 2.0, True),  # the broker waited its 2 s for the callout, then refused
        (ConnectionRefusedError(), 0.01, False),
        (nats_errors.Error("nats: 'maximum connections exceeded'"), 0.01, False),
    ],
)
def test_which_failures_mean_the_broker_could_not_authorise_in_time(error, elapsed_s, timed_out):
    assert _admission_timed_out(error, elapsed_s, callout_timeout_s=2.0) is timed_out


def giving_up(client: CorralClient, *causes: BaseException) -> None:
    """Attempts that nats-py gives up on with NoServersError, having told the client's error
    callback ``causes`` in turn (the last one again and again), then one that connects."""
    remaining = list(causes)

    async def open_once():
        if not remaining:
            return "connected"
        client.errors.append(remaining.pop(0))
        raise nats_errors.NoServersError()

    client._open = open_once  # type: ignore[method-assign]


async def test_a_tcp_connect_that_timed_out_in_a_storm_is_tried_again_though_nats_py_says_no_servers():
    # In a storm of thousands of connects the broker's listen queue fills: a TCP connect times
    # out, and nats-py, allowed one server and no retry, raises NoServersError after it.
    client = attempting("connected")
    giving_up(client, TimeoutError(), ConnectionResetError())
    assert await client._admitted() == "connected"
    assert client.attempts == 3


async def test_no_servers_because_nothing_listens_fails_at_once():
    client = attempting("connected")
    giving_up(client, ConnectionRefusedError(111, "Connection refused"))
    with pytest.raises(nats_errors.NoServersError):
        await client._admitted()
    assert client.attempts == 1
