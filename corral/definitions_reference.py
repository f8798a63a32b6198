"""The definitions format, generated from its pydantic models: a JSON Schema for editors
(``contracts/definitions.schema.json``) and the reference part of ``docs/definitions.md``.

Both are checked in; ``tests/unit/test_definitions_reference.py`` keeps them current and
``scripts/definitions_reference.py`` writes them. The reference lists every model reachable from
:class:`~contracts.definitions.DefinitionsFile`, where it is used, its docstring, and each key
with its type, default and ``Field(description=...)``; the examples are the hand-written part
of ``docs/definitions.md``, above the generated one.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, JsonValue, WithJsonSchema
from pydantic.fields import FieldInfo
from pydantic_core import to_json

from contracts.definitions import DefinitionsFile
from contracts.tenants import NAME_PATTERN

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "contracts" / "definitions.schema.json"
REFERENCE_FILE = ROOT / "docs" / "definitions.md"
# Everything below this line of docs/definitions.md is generated.
MARKER = "<!-- generated from contracts/ by scripts/definitions_reference.py: do not edit below -->"
# The first line of a definitions file that tells an editor (yaml-language-server) the schema.
SCHEMA_LINE = "# yaml-language-server: $schema="
_NAME_SCHEMA = f"^{NAME_PATTERN.pattern}$"
# What keys that many models have are for, where a model says nothing of its own.
_GENERIC = {
    "name": "Its name, unique among its kind: what other definitions refer to it by.",
    "description": "What it is for (shown to people, and to a model that may call it).",
    "kind": "Which kind of node or step it is.",
    "timeout_s": "Seconds it may take.",
}


# ---- the JSON Schema -------------------------------------------------------------------


def render_schema() -> str:
    """The JSON Schema of a definitions file, as checked in."""
    schema = DefinitionsFile.model_json_schema(by_alias=True)
    # A union member's tag has a default in Python, but a file must write it: pydantic cannot
    # pick the member otherwise ("Unable to extract tag").
    definitions = schema["$defs"]
    for mapping in _discriminators(schema):
        tag = mapping["propertyName"]
        for reference in mapping["mapping"].values():
            member = definitions[reference.rsplit("/", 1)[1]]
            member["required"] = [tag, *(key for key in member.get("required", []) if key != tag)]
            member["properties"][tag].pop("default", None)
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Corral definitions file",
        **{key: value for key, value in schema.items() if key != "title"},
    }
    document["description"] = (
        "Tools, models, graphs, workflows and tenants of a Corral deployment (docs/definitions.md). "
        "Generated from contracts/ by scripts/definitions_reference.py."
    )
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _discriminators(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("discriminator"), dict) and "mapping" in node["discriminator"]:
            found.append(node["discriminator"])
        for value in node.values():
            found += _discriminators(value)
    elif isinstance(node, list):
        for value in node:
            found += _discriminators(value)
    return found


# ---- the reference -----------------------------------------------------------------------


def render_reference() -> str:
    """The generated part of docs/definitions.md (after :data:`MARKER`)."""
    sections = _models()
    lines = [
        "## Reference",
        "",
        "Every key of every definition: its type, its default (*required* when it has none) and what it "
        "does. A *name* is `[A-Za-z0-9][A-Za-z0-9_-]{0,63}`; a *template* is text with `{path}` "
        "placeholders; an argument that is a string `$path` reads the run state.",
        "",
        " · ".join(f"[{model.__name__}](#{model.__name__.lower()})" for model, _ in sections),
        "",
    ]
    for model, where in sections:
        lines += _section(model, where)
    return "\n".join(lines).rstrip() + "\n"


def updated_reference(text: str) -> str:
    """``docs/definitions.md``'s text with its generated part replaced by the current one."""
    head, found, _ = text.partition(MARKER)
    if not found:
        raise ValueError(f"no marker line in the reference: {MARKER}")
    return f"{head}{MARKER}\n\n{render_reference()}"


def _models() -> list[tuple[type[BaseModel], str]]:
    """Every model reachable from the file's, in breadth-first order, with where it is first met."""
    found: dict[type[BaseModel], str] = {DefinitionsFile: ""}
    queue: list[tuple[type[BaseModel], str]] = [(DefinitionsFile, "")]
    while queue:
        model, path = queue.pop(0)
        for key, field in _fields(model):
            for child, where, tag in _children(field.annotation, f"{path}.{key}" if path else key):
                if child not in found:
                    found[child] = f"At `{where}`" + (f", with `{tag}`." if tag else ".")
                    queue.append((child, where))
    return list(found.items())


def _children(annotation: Any, path: str) -> list[tuple[type[BaseModel], str, str]]:
    """The models inside an annotation, each with its path (``graphs[].nodes.<name>``) and, for a
    member of a union, its tag (``kind: tool``)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *metadata = args
        tag = next((m.discriminator for m in metadata if isinstance(m, FieldInfo) and m.discriminator), None)
        if tag is not None:
            return [
                (member, path, f"{tag}: {_tag(member, str(tag))}")
                for member in typing.get_args(base)
                if _is_model(member)
            ]
        return _children(base, path)
    if origin in (typing.Union, types.UnionType):
        return [found for member in args for found in _children(member, path)]
    if origin is list:
        return _children(args[0], f"{path}[]")
    if origin is dict:
        return _children(args[1], f"{path}.<name>")
    if _is_model(annotation):
        return [(annotation, path, "")]
    return []


def _section(model: type[BaseModel], where: str) -> list[str]:
    lines = [f"### {model.__name__}", "", where or "The file itself.", ""]
    if model.__doc__ and model.__doc__ is not BaseModel.__doc__:
        lines += [_markdown(inspect.cleandoc(model.__doc__)), ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    for key, field in _fields(model):
        description = _markdown(field.description or _GENERIC.get(key, ""))
        cells = [f"`{key}`", _type_of(model, key, field), _default(model, key, field), description]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return [*lines, ""]


def _fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """The keys as written in a file: ``kind`` first, then the model's own, then inherited ones."""
    own = set(vars(model).get("__annotations__", {}))
    fields = [(field.alias or name, name, field) for name, field in model.model_fields.items()]
    order = sorted(
        range(len(fields)), key=lambda i: (fields[i][1] != "kind", fields[i][1] not in own and fields[i][1] != "name")
    )
    return [(fields[i][0], fields[i][2]) for i in order]


def _type_of(model: type[BaseModel], key: str, field: FieldInfo) -> str:
    if key == "kind" and typing.get_origin(field.annotation) is typing.Literal:
        return " | ".join(f"`{_value(value)}`" for value in typing.get_args(field.annotation))
    text = "name" if _is_name(field) else _type(field.annotation)
    limits = []
    for meta in field.metadata:
        for attribute, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            if getattr(meta, attribute, None) is not None:
                limits.append(f"{sign} {getattr(meta, attribute):,}".replace(",", "_"))
        if getattr(meta, "min_length", None):
            limits.append(f"at least {meta.min_length}")
        if getattr(meta, "max_length", None):
            limits.append(f"at most {meta.max_length}")
        if getattr(meta, "pattern", None):
            limits.append(f"`{meta.pattern}`")
    return ", ".join([text, *limits])


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *metadata = args
        if any(isinstance(m, WithJsonSchema) and m.json_schema.get("pattern") == _NAME_SCHEMA for m in metadata):
            return "name"
        tag = next((m.discriminator for m in metadata if isinstance(m, FieldInfo) and m.discriminator), None)
        if tag is not None:
            members = [m for m in typing.get_args(base) if _is_model(m)]
            return "one of " + ", ".join(_link(m) for m in members) + f" (by `{tag}`)"
        return _type(base)
    if origin in (typing.Union, types.UnionType):
        members = [member for member in args if member is not type(None)]
        return " or ".join(_type(member) for member in members)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        if args[1] is Any:
            return "mapping"
        return f"map of {_type(args[0])} to {_type(args[1])}"
    if origin is typing.Literal:
        return " | ".join(f"`{_value(value)}`" for value in args)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " | ".join(f"`{member.value}`" for member in annotation)
    if _is_model(annotation):
        return _link(annotation)
    if annotation is JsonValue:
        return "any JSON value"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(annotation, str(annotation))


def _default(model: type[BaseModel], key: str, field: FieldInfo) -> str:
    if field.is_required() or (key == "kind" and typing.get_origin(field.annotation) is typing.Literal):
        return "*required*"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return f"[its defaults](#{type(value).__name__.lower()})"
    return f"`{to_json(value).decode()}`"


def _is_name(field: FieldInfo) -> bool:
    return any(isinstance(m, WithJsonSchema) and m.json_schema.get("pattern") == _NAME_SCHEMA for m in field.metadata)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _link(model: type[BaseModel]) -> str:
    return f"[{model.__name__}](#{model.__name__.lower()})"


def _tag(model: type[BaseModel], tag: str) -> str:
    values = typing.get_args(model.model_fields[tag].annotation)
    return _value(values[0]) if values else "?"


def _value(value: Any) -> str:
    return str(value.value if isinstance(value, Enum) else value)


def _markdown(text: str) -> str:
    """A docstring as Markdown: ``code`` in single backticks, paragraphs kept, lines joined."""
    text = text.replace("``", "`")
    text = re.sub(r":(?:class|meth|func|data):`~?([^`]+)`", r"`\1`", text)
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n"))
