"""Load-time checks of what templates, arguments and conditions read from a run's state.

A template's ``{path}``, an argument's ``$path`` and a condition's paths are read only when the
run gets there, and a path that leads nowhere reads nothing: ``{lokup.status}`` renders as empty
text. So graphs and workflows check each reference when they are loaded, with these helpers: its
first name must be something the state holds at that point, and an input field must be one the
declared input schema has. Hints catch the usual slips: ``{{x}}``, ``{ x }``, ``$x`` in a template,
``{x}`` as an argument.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from contracts.definitions_base import Location, Problem, did_you_mean
from contracts.expressions import ExpressionError, argument_paths, paths_in, placeholders

_NAME = r"[A-Za-z_][\w.\-]*"
_DOUBLE_BRACES = re.compile(r"\{\{\s*(" + _NAME + r")\s*\}\}")
_SPACED = re.compile(r"\{(?:\s+(" + _NAME + r")\s*|(" + _NAME + r")\s+)\}")
_DOLLAR = re.compile(r"\$([A-Za-z_]\w*(?:\.[\w\-]+)*)")
_WHOLE_PLACEHOLDER = re.compile(r"\{(" + _NAME + r")\}")


@dataclass(frozen=True)
class Reference:
    """One path into the run state, as written at ``where`` (inside its node or step)."""

    where: Location
    path: str  # input.text
    shown: str  # as written: {input.text}, $input.text, or the path itself in a condition

    @property
    def name(self) -> str:
        return self.path.split(".")[0]

    @property
    def field(self) -> str | None:
        """The second step of the path (an input field, a key of a node's output), if any."""
        parts = self.path.split(".")
        return parts[1] if len(parts) > 1 else None


def template_references(text: str | None, where: Location) -> list[Reference]:
    return [Reference(where, path, f"{{{path}}}") for path in placeholders(text or "")]


def argument_references(value: Any, where: Location) -> list[Reference]:
    return [Reference((*where, *inner), path, f"${path}") for inner, path in argument_paths(value)]


def condition_references(source: str | None, where: Location) -> list[Reference]:
    if source is None:
        return []
    try:
        return [Reference(where, path, path) for path in paths_in(source)]
    except (SyntaxError, ExpressionError):  # reported by the condition's own validator
        return []


def template_slips(text: str | None, where: Location, names: Iterable[str]) -> list[Problem]:
    """Placeholders written the way other template languages write them, which render as text here."""
    if not text:
        return []
    known = set(names)
    problems = [
        Problem(where, f"{match.group(0)!r}: placeholders take single braces: {{{match.group(1)}}}")
        for match in _DOUBLE_BRACES.finditer(text)
    ]
    problems += [
        Problem(where, f"{match.group(0)!r}: no spaces inside a placeholder: {{{match.group(1) or match.group(2)}}}")
        for match in _SPACED.finditer(text)
    ]
    problems += [
        Problem(where, f"'${match.group(1)}' in a template is text: write {{{match.group(1)}}}")
        for match in _DOLLAR.finditer(text)
        if match.group(1).split(".")[0] in known
    ]
    return problems


def argument_slips(value: Any, where: Location, names: Iterable[str]) -> list[Problem]:
    """An argument written as a template placeholder, which is passed on as that text."""
    known = set(names)
    problems = []
    for inner, text in _strings(value):
        match = _WHOLE_PLACEHOLDER.fullmatch(text)
        if match and match.group(1).split(".")[0] in known:
            problems.append(
                Problem((*where, *inner), f"{text!r} is passed as text: an argument reads ${match.group(1)}")
            )
    return problems


def declared_fields(schema: dict[str, Any] | None) -> set[str] | None:
    """The fields an input schema declares (its ``properties``); None when it declares none."""
    if not isinstance(schema, dict) or not isinstance(schema.get("properties"), dict):
        return None
    return set(schema["properties"])


def input_field_problem(reference: Reference, schema: dict[str, Any] | None) -> Problem | None:
    """A reference to an input field that the input schema does not declare."""
    fields = declared_fields(schema)
    field = reference.field
    if fields is None or field is None or field in fields:
        return None
    return Problem(
        reference.where,
        f"{reference.shown} reads input field {field!r}, which the input_schema does not declare"
        + did_you_mean(field, fields),
    )


def _strings(value: Any, where: Location = ()) -> list[tuple[Location, str]]:
    if isinstance(value, str):
        return [(where, value)]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in _strings(item, (*where, key))]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in _strings(item, (*where, index))]
    return []
