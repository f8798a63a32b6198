"""docs/bus.md shows what the bus really takes and gives: every JSON block is an envelope the
envelope decoder accepts and the AsyncAPI document's schema of its kind validates, its tables name
every error code (with whether it is retryable) and every event type, and its program is
examples/raw_nats.py (which tests/integration/test_raw_nats_client.py runs)."""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from pathlib import Path
from urllib.parse import quote

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from contracts import subjects
from contracts.envelope import PAYLOADS, EventType, Kind, decode_envelope
from contracts.errors import ErrorCode, error_for
from corral.asyncapi import render_asyncapi

ROOT = Path(__file__).resolve().parents[2]
BUS = (ROOT / "docs" / "bus.md").read_text()
EXAMPLE = ROOT / "examples" / "raw_nats.py"
DOCUMENT = "urn:corral:asyncapi"
JSON_BLOCKS = re.findall(r"^ *```json\n(.*?)^ *```", BUS, re.S | re.M)


def table_rows(first_column: str) -> dict[str, list[str]]:
    """The rows of the markdown table whose header starts with ``first_column``, by first cell."""
    start = BUS.index(f"| {first_column} |")
    rows: dict[str, list[str]] = {}
    for line in BUS[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for name in re.findall(r"`([a-z_]+)`", cells[0]):
            rows[name] = cells[1:]
    return rows


@cache
def asyncapi() -> dict:
    return json.loads(render_asyncapi("json"))


def validator(kind: Kind) -> jsonschema.Draft202012Validator:
    """The schema of ``kind``'s envelope, as a message of the AsyncAPI document refers to it."""
    ref = "#/components/schemas/" + quote(f"Envelope[{PAYLOADS[kind].__name__}]")
    used = [m for m in asyncapi()["components"]["messages"].values() if m["payload"].get("$ref") == ref]
    assert used, f"no message of the AsyncAPI document carries {kind.value} envelopes"
    registry = Registry().with_resource(DOCUMENT, Resource.from_contents(asyncapi(), default_specification=DRAFT202012))
    return jsonschema.Draft202012Validator({"$ref": DOCUMENT + ref}, registry=registry)


def test_the_page_shows_an_envelope_of_each_kind_a_client_sends_or_receives():
    kinds = {decode_envelope(block).kind for block in JSON_BLOCKS}
    assert {Kind.REQUEST, Kind.RESULT, Kind.ERROR, Kind.EVENT, Kind.WORKFLOW_SIGNAL, Kind.WORKFLOW_QUERY} <= kinds


@pytest.mark.parametrize("block", JSON_BLOCKS, ids=[f"block{i}" for i in range(len(JSON_BLOCKS))])
def test_every_json_example_is_a_valid_envelope_and_matches_the_asyncapi_schema_of_its_kind(block):
    envelope = decode_envelope(block)  # strict: unknown fields, wrong types and ids are refused
    errors = [error.message for error in validator(envelope.kind).iter_errors(json.loads(block))]
    assert errors == []


def test_the_error_code_table_lists_every_code_and_which_are_retryable():
    rows = table_rows("code")
    assert set(rows) == {code.value for code in ErrorCode}
    for code in ErrorCode:
        assert rows[code.value][0] == ("yes" if error_for(code, "").retryable else "no"), code


def test_the_event_table_lists_every_event_type():
    assert set(table_rows("type")) == {event.value for event in EventType}


def test_the_nats_py_program_on_the_page_is_examples_raw_nats_py():
    assert EXAMPLE.read_text() in re.findall(r"```python\n(.*?)```", BUS, re.S)


def test_the_principal_tokens_shown_are_what_contracts_subjects_computes():
    for sub in ("dev", "manager"):
        assert f"`{subjects.principal_token(sub)}`" in BUS
    assert f"`{subjects.scope_token('refund:approve')}`" in BUS


def test_the_example_computes_the_principal_token_as_contracts_subjects_does():
    import base64

    for sub in ("dev", "alice@example.com", "auth0|12345", "ünï"):
        assert base64.b32encode(sub.encode()).decode().rstrip("=").lower() == subjects.principal_token(sub)


def test_the_example_needs_nothing_but_nats_py_and_the_standard_library():
    import ast

    imported: set[str] = set()
    for node in ast.walk(ast.parse(EXAMPLE.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"nats"}
