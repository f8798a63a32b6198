"""Tenant ids and subjects: the partition key can never widen a subject."""

import pytest

from contracts import subjects
from contracts.errors import InvalidRequest
from contracts.tenants import is_tenant_id, validate_name, validate_tenant_id


@pytest.mark.parametrize("tenant", ["acme", "a", "globex-2", "t_1", "0abc", "a" * 63])
def test_valid_tenant_ids_are_accepted(tenant):
    assert validate_tenant_id(tenant) == tenant


@pytest.mark.parametrize(
    "tenant", ["", "*", ">", "a.b", "ACME", "acme ", " acme", "acme\n", "-acme", "_acme", "a" * 64, "é", "a*", "t.>"]
)
def test_invalid_tenant_ids_are_refused(tenant):
    with pytest.raises(InvalidRequest):
        validate_tenant_id(tenant)


def test_non_string_tenant_is_refused():
    with pytest.raises(InvalidRequest):
        validate_tenant_id(None)


def test_builders_put_the_tenant_in_the_second_token():
    assert subjects.router_request("acme", "dev") == "t.acme.router.request.mrsxm"
    assert subjects.tool_call("acme", "orders_lookup") == "t.acme.tool.orders_lookup.call"
    assert subjects.events("acme", "dev", "run1") == "t.acme.events.mrsxm.run1"
    assert subjects.events("acme", None, "run1") == "t.acme.events._.run1"
    assert subjects.inbox_prefix("acme") == "_INBOX.acme"


@pytest.mark.parametrize("bad", ["*", ">", "a.b", ""])
def test_builders_refuse_wildcards_and_dots_in_every_token(bad):
    with pytest.raises(InvalidRequest):
        subjects.tool_call("acme", bad)
    with pytest.raises(InvalidRequest):
        subjects.events("acme", "dev", bad)
    with pytest.raises(InvalidRequest):
        subjects.router_request(bad, "dev")


def test_service_inboxes_can_never_be_a_tenant_inbox():
    prefix = subjects.service_inbox_prefix("router")
    tenant_token = prefix.split(".")[1]
    assert not is_tenant_id(tenant_token)


def test_parse_takes_the_tenant_from_the_subject():
    parsed = subjects.parse("t.acme.tool.orders_lookup.call")
    assert parsed.tenant == "acme"
    assert parsed.tool == "orders_lookup"


@pytest.mark.parametrize(
    "subject",
    ["acme.router.request", "t.ACME.router.request", "t.acme", "t.*.router.request", "t.acme.events.>", "t.acme..x"],
)
def test_parse_refuses_malformed_subjects(subject):
    with pytest.raises(InvalidRequest):
        subjects.parse(subject)


def test_reply_must_be_inside_the_tenant_inbox():
    assert subjects.reply_belongs_to("_INBOX.acme.abc", "acme")
    assert not subjects.reply_belongs_to("_INBOX.acmex.abc", "acme")
    assert not subjects.reply_belongs_to("_INBOX.globex.abc", "acme")
    assert not subjects.reply_belongs_to("_INBOX.acme.", "acme")
    assert not subjects.reply_belongs_to("t.acme.events.x", "acme")


def test_names_refuse_dots():
    with pytest.raises(InvalidRequest):
        validate_name("orders.lookup")


@pytest.mark.parametrize(
    "principal", ["dev", "alice@example.com", "auth0|5f7c8ec7c33c6c004bbafe82", "a.b*c>d e", "ünïcødé", "x" * 128]
)
def test_any_principal_becomes_one_safe_subject_token_and_back(principal):
    token = subjects.principal_token(principal)
    assert token.isascii() and token.isalnum() and token == token.lower()
    assert subjects.principal_of(token) == principal
    assert subjects.router_request("acme", principal).split(".")[4] == token


@pytest.mark.parametrize("principal", ["", "x" * 129])
def test_a_principal_must_be_1_to_128_bytes(principal):
    with pytest.raises(InvalidRequest):
        subjects.principal_token(principal)


@pytest.mark.parametrize("token", ["", "*", ">", "MRSXM", "mrsxm1", "a", "mrsxma", "mrsx m"])
def test_a_subject_token_that_is_not_exactly_one_principals_spelling_is_refused(token):
    with pytest.raises(InvalidRequest):
        subjects.principal_of(token)
