"""The AsyncAPI document is the whole bus: every subject family contracts/subjects.py builds is one
of its channels, every envelope operation names its replies, and messages correlate by the
envelope's body field."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from functools import cache
from typing import Any
from urllib.parse import quote

import pytest

from contracts import subjects
from contracts.envelope import PAYLOADS
from corral.asyncapi import render_asyncapi

# A value for each parameter a subject builder takes; a builder with another is a new family
# this test must learn about (the enumeration test fails until it does).
SAMPLES = {
    "tenant": "acme",
    "principal": "dev",
    "scope": "refund:approve",
    "scopes": frozenset({"refund:approve", "support:vip"}),
    "run_id": "run-1",
    "tool": "orders_lookup",
    "service": "router",
}
# Functions of contracts/subjects.py that read or encode subjects rather than build one.
NOT_BUILDERS = {
    "principal_token",
    "principal_of",
    "scope_token",
    "scope_of",
    "scopes_token",
    "scopes_of",
    "tenant_token",
    "parse",
    "reply_belongs_to",
}


def builders() -> dict[str, Callable[..., str]]:
    return {
        name: function
        for name, function in vars(subjects).items()
        if inspect.isfunction(function)
        and function.__module__ == subjects.__name__
        and not name.startswith("_")
        and name not in NOT_BUILDERS
    }


def built(name: str, function: Callable[..., str]) -> list[str]:
    """What a builder makes, with every parameter given and with its optional ones left out;
    an inbox prefix stands for every subject under it."""
    parameters = inspect.signature(function).parameters
    full = {p: SAMPLES[p] for p in parameters}
    required = {p: SAMPLES[p] for p, spec in parameters.items() if spec.default is inspect.Parameter.empty}
    made = {function(**full), function(**required)}
    return sorted(f"{subject}.>" if name.endswith("_prefix") else subject for subject in made)


def families() -> list[tuple[str, str]]:
    """(where it comes from, subject or pattern) for every constant and builder of the module."""
    constants = [
        (name, value)
        for name, value in vars(subjects).items()
        if name.isupper() and isinstance(value, str) and "." in value  # PREFIX, INBOX: tokens, not subjects
    ]
    made = [(name, subject) for name, function in builders().items() for subject in built(name, function)]
    return constants + made


@cache
def document() -> dict[str, Any]:
    return json.loads(render_asyncapi("json"))


def matches(subject: str, address: str) -> bool:
    """Whether a subject or subscription pattern falls within a channel address: a placeholder
    matches one token (a literal or ``*``), ``>`` the rest of the address."""
    wanted, have = subject.split("."), address.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(have) > index
        if index >= len(have):
            return False
        placeholder = re.sub(r"\\\{[a-z_]+\\\}", "[^.]+", re.escape(have[index]))
        if token == "*":
            if "{" not in have[index]:
                return False
        elif not re.fullmatch(placeholder, token):
            return False
    return len(wanted) == len(have)


def test_every_builder_of_contracts_subjects_takes_only_known_parameters():
    for name, function in builders().items():
        unknown = set(inspect.signature(function).parameters) - set(SAMPLES)
        assert not unknown, f"subjects.{name} takes {unknown}: add a sample value (and its channel)"


@pytest.mark.parametrize(("source", "subject"), families(), ids=[f"{s}:{x}" for s, x in families()])
def test_every_subject_contracts_builds_is_a_channel_of_the_asyncapi_document(source, subject):
    addresses = [channel["address"] for channel in document()["channels"].values() if channel.get("address")]
    assert any(matches(subject, address) for address in addresses), f"subjects.{source} builds {subject}"


def test_the_matcher_tells_channels_apart():
    assert matches("t.acme.events.mrsxm.run-1", "t.{tenant}.events.{principal}.{run_id}")
    assert matches("t.*.workflow.signal.>", "t.{tenant}.workflow.signal.{principal}")
    assert matches("_INBOX._router.>", "_INBOX._{service}.{reply}")
    assert not matches("t.acme.events.>", "t.{tenant}.audit.{service}")
    assert not matches("_INBOX.acme.mrsxm.>", "_INBOX.{tenant}.{reply}")
    assert not matches("t.acme.graph.run.x", "t.{tenant}.graph.run")


def test_messages_correlate_by_the_envelopes_body_field_never_a_header():
    messages = document()["components"]["messages"]
    envelopes = [m for m in messages.values() if m["payload"].get("$ref", "").startswith("#/components/schemas/Env")]
    assert len(envelopes) >= 10
    for message in envelopes:
        assert message["correlationId"]["location"] == "$message.payload#/correlation_id", message["title"]
    assert "$message.header" not in json.dumps(document())


def test_every_operation_that_takes_an_envelope_names_the_result_and_error_it_answers_with():
    doc = document()
    for title, operation in doc["operations"].items():
        if operation["action"] != "receive" or title in ("workflow:task", "auth:callout", "ping", "leaving", "stats"):
            continue
        reply = operation["reply"]
        channel = reply["channel"]["$ref"].rsplit("/", 1)[1]
        assert channel.startswith("inbox"), title
        assert [m["$ref"].rsplit("/", 1)[1] for m in reply["messages"]] == ["Result", "Error"]
    tenant_facing = ("router:request", "workflow:signal", "workflow:signal:scoped", "workflow:query")
    for title in tenant_facing:
        assert doc["operations"][title]["reply"]["channel"]["$ref"] == "#/channels/inbox"
    assert doc["operations"]["tools:call"]["reply"]["channel"]["$ref"] == "#/channels/inbox:service"
    for title in ("ping", "stats", "auth:callout"):
        assert doc["operations"][title]["reply"]["channel"]["$ref"] == "#/channels/reply"


def test_each_envelope_schema_names_the_one_kind_it_travels_in():
    schemas = document()["components"]["schemas"]
    kinds = {payload.__name__: kind for kind, payload in PAYLOADS.items()}
    envelopes = {name: schema for name, schema in schemas.items() if name.startswith("Envelope[")}
    for name, schema in envelopes.items():
        payload = name.removeprefix("Envelope[").removesuffix("]")
        assert schema["properties"]["kind"] == {"const": kinds[payload].value, "title": "Kind"}
        assert schema["properties"]["payload"] == {"$ref": "#/components/schemas/" + quote(payload)}
    client_kinds = {"request", "result", "error", "event", "workflow_signal", "workflow_query"}
    assert client_kinds <= {schema["properties"]["kind"]["const"] for schema in envelopes.values()}


def test_every_address_placeholder_is_a_described_parameter():
    for name, channel in document()["channels"].items():
        placeholders = re.findall(r"\{([a-z_]+)\}", channel.get("address") or "")
        assert sorted(channel.get("parameters", {})) == sorted(placeholders), name
        assert all(p["description"] for p in channel.get("parameters", {}).values())
