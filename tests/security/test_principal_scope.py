"""A tenant whose policy scopes its users to their principal: each user reads only its own
replies and run events, and cannot have a service answer into a colleague's inbox. By default
the users of a tenant share its inbox namespace and events (isolation is between tenants)."""

from __future__ import annotations

import pytest
import yaml

from contracts import subjects
from contracts.envelope import Kind, RouterRequest, new_envelope_json
from contracts.errors import Forbidden
from contracts.replies import decode_reply
from corral.client import CorralClient
from services.auth.tokens import mint_dev_token
from tests.security.conftest import watched_connection
from tests.support.services import running_services

ROUTES = {"order_status": {"graph": "order_status"}}
DEFINITIONS = {
    "tools": [{"name": "orders_lookup", "python": {"callable": "corral.demo.tools:lookup_orders"}}],
    "graphs": [
        {
            "name": "order_status",
            "entry": "lookup",
            "nodes": {"lookup": {"kind": "tool", "tool": "orders_lookup", "args": {"query": "$input.text"}}},
        }
    ],
    "tenants": [
        {"tenant": "acme", "default_route": "order_status", "routes": ROUTES, "tools": ["orders_lookup"],
         "principal_scoped": True},
        {"tenant": "globex", "default_route": "order_status", "routes": ROUTES, "tools": ["orders_lookup"]},
    ],
}  # fmt: skip


@pytest.fixture
async def system(secured, tmp_path):
    (tmp_path / "defs.yaml").write_text(yaml.safe_dump(DEFINITIONS))
    names = ("auth", "router", "graph", "tools")
    async with running_services(secured.url, secured.state_dir, names, definitions=tmp_path / "defs.yaml"):
        yield secured


async def user(broker, tenant: str, sub: str, *, own_inbox: bool = True):
    return await watched_connection(
        broker.url,
        token=mint_dev_token(tenant, key=broker.secrets.dev_key, sub=sub),
        inbox_prefix=subjects.inbox_prefix(tenant, sub if own_inbox else None).encode(),
    )


@pytest.mark.parametrize(
    "subject",
    [
        "_INBOX.acme.>",  # the whole tenant's replies
        f"_INBOX.acme.{subjects.principal_token('bob')}.>",  # a colleague's
        "t.acme.events.>",  # every user's run events
        f"t.acme.events.{subjects.principal_token('bob')}.>",
    ],
)
async def test_a_scoped_user_cannot_read_a_colleagues_replies_or_events(system, subject):
    alice = await user(system, "acme", "alice")
    try:
        await alice.nc.subscribe(subject)
        assert f'subscription to "{subject.lower()}"' in await alice.violation()
    finally:
        await alice.nc.close()


async def test_a_scoped_user_cannot_have_a_service_answer_into_a_colleagues_inbox(system):
    alice, bob = await user(system, "acme", "alice"), await user(system, "acme", "bob")
    try:
        bobs = await bob.nc.subscribe(f"{subjects.inbox_prefix('acme', 'bob')}.>")
        await bob.nc.flush()
        body = new_envelope_json(Kind.REQUEST, "acme", RouterRequest(input={"text": "where is my order?"}))
        request = subjects.router_request("acme", "alice")
        await alice.nc.publish(request, body, reply=f"{subjects.inbox_prefix('acme', 'bob')}.spoof")
        answer = await alice.nc.request(request, body, timeout=10)  # after it, from one publisher
        assert decode_reply(answer.data)["order"]["id"].startswith("A-")
        await bob.nc.flush()
        assert bobs.pending_msgs == 0  # neither an answer nor the refusal reached bob
    finally:
        await alice.nc.close()
        await bob.nc.close()


async def test_a_scoped_users_own_requests_and_events_work(system):
    client = await CorralClient.connect(
        system.url, tenant="acme", token=mint_dev_token("acme", key=system.secrets.dev_key, sub="alice")
    )
    try:
        result = await client.request("where is my order?")
    finally:
        await client.close()
    assert result.output["order"]["id"].startswith("A-")
    assert [event.type.value for event in result.events][-1] == "completed"


async def test_by_default_a_tenants_users_share_its_inbox_namespace_and_events(system):
    """The documented default: a tenant without the scope shares them between its users."""
    carol = await user(system, "globex", "carol", own_inbox=False)
    try:
        await carol.nc.subscribe("_INBOX.globex.>")
        await carol.nc.subscribe("t.globex.events.>")
        await carol.nc.flush()
        await carol.nc.flush()
        assert carol.errors == []
    finally:
        await carol.nc.close()


async def test_a_reply_into_a_colleagues_inbox_is_refused_with_a_typed_error_to_the_sender():
    from services.runtime.guard import check_reply

    with pytest.raises(Forbidden, match="principal 'alice'"):
        check_reply(f"{subjects.inbox_prefix('acme', 'bob')}.x", "acme", allow_service_inbox=False, principal="alice")
    check_reply(f"{subjects.inbox_prefix('acme', 'alice')}.x", "acme", allow_service_inbox=False, principal="alice")
