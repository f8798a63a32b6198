"""The definitions format's generated files follow the models, and editors can use the schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from corral.definitions_reference import (
    MARKER,
    REFERENCE_FILE,
    SCHEMA_FILE,
    SCHEMA_LINE,
    render_reference,
    render_schema,
    updated_reference,
)
from corral.demo import DEFINITIONS as DEMO
from corral.state import copy_demo_definitions

REGENERATE = "run: .venv/bin/python scripts/definitions_reference.py"


def test_the_checked_in_json_schema_is_current():
    assert SCHEMA_FILE.read_text() == render_schema(), REGENERATE


def test_the_checked_in_reference_is_current():
    text = REFERENCE_FILE.read_text()
    assert MARKER in text
    assert text == updated_reference(text), REGENERATE


def test_the_reference_lists_every_key_of_a_model_with_its_type_and_default():
    reference = render_reference()
    assert "### ToolNode" in reference and "At `graphs[].nodes.<name>`, with `kind: tool`." in reference
    assert "| `args` | map of string to any JSON value | `{}` |" in reference
    assert "| `tenant` | string | *required* |" in reference
    assert "| `python_paths` | list of string | `[]` |" in reference


def test_every_demo_file_names_the_schema_and_matches_it():
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    for path in sorted(DEMO.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith(SCHEMA_LINE), path
        assert (path.parent / first.removeprefix(SCHEMA_LINE)).resolve() == SCHEMA_FILE
        errors = [error.message for error in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert errors == [], path


def test_the_schema_refuses_what_the_models_refuse():
    """An editor flags what the loader would: an unknown key, a node without its kind, a bad name."""
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    for bad in (
        {"tool": []},
        {"graphs": [{"name": "g", "entry": "a", "nodes": {"a": {"tool": "x"}}}]},
        {"graphs": [{"name": "g", "entry": "a", "nodes": {"a": {"kind": "tool", "tool": "x", "argz": {}}}}]},
        {"tools": [{"name": "a.b", "python": {"callable": "m:f"}}]},
        {"tenants": [{"name": "acme"}]},
    ):
        assert not validator.is_valid(bad), bad


def test_corral_init_points_the_copies_at_the_installed_schema(tmp_path: Path):
    copy_demo_definitions(tmp_path / "definitions")
    for path in sorted((tmp_path / "definitions").glob("*.yaml")):
        first, rest = path.read_text().split("\n", 1)
        assert first == f"{SCHEMA_LINE}{SCHEMA_FILE}"
        assert rest == (DEMO / path.name).read_text().split("\n", 1)[1]


def test_the_asyncapi_document_of_a_deployment_shows_its_graphs_input_schemas():
    from corral.asyncapi import render_asyncapi
    from services.runtime.catalog import load_catalog

    document = yaml.safe_load(render_asyncapi("yaml", load_catalog(DEMO)))
    assert document["components"]["schemas"]["GraphInput[order_status]"]["required"] == ["text"]
    message = document["components"]["messages"]["router:request:order_status"]
    assert "acme: order_status" in message["summary"]
    assert message["payload"]["allOf"][1]["properties"]["payload"]["properties"]["input"] == {
        "$ref": "#/components/schemas/GraphInput%5Border_status%5D"
    }
    assert "router:request:order_status" in document["channels"]["router:request"]["messages"]
