"""JSON Schemas checked on a hot path (the router checks each request's input against its graph's):
compiled once, with a quick check in front for the common shape.

Most input schemas are a flat object of scalar properties (``{text: string}``, required). For those
a few ``isinstance`` checks decide what ``jsonschema`` would, at a fraction of its cost; the quick
check only ever accepts, so whatever it does not accept is decided by ``jsonschema``. (The tools
service has the same check for tool arguments, ``services/toolkit/arguments.py``.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonschema

_SCALARS: dict[str, Callable[[Any], bool]] = {
    "string": lambda value: isinstance(value, str),
    "boolean": lambda value: isinstance(value, bool),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "number": lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    "null": lambda value: value is None,
}
# Keywords that do not change what is valid.
_ANNOTATIONS = frozenset({"title", "description", "examples", "default", "$comment", "deprecated"})
_OBJECT_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties", "$schema"}) | _ANNOTATIONS


class CompiledSchema:
    """A JSON Schema compiled once; :meth:`first_error` is None for a valid value."""

    __slots__ = ("quick", "validator")

    def __init__(self, schema: dict[str, Any]) -> None:
        self.validator = jsonschema.validators.validator_for(schema)(schema)
        self.quick = quick_check(schema)

    def first_error(self, value: Any) -> jsonschema.ValidationError | None:
        if (self.quick is not None and self.quick(value)) or self.validator.is_valid(value):
            return None
        return jsonschema.exceptions.best_match(self.validator.iter_errors(value))


def quick_check(schema: dict[str, Any]) -> Callable[[Any], bool] | None:
    """For a flat object schema of scalar properties, a check that is True only for values the
    schema accepts; None for any other schema."""
    if schema.get("type") != "object" or not _OBJECT_KEYWORDS.issuperset(schema):
        return None
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    closed = schema.get("additionalProperties", True)
    if not isinstance(properties, dict) or not isinstance(required, list) or closed not in (True, False):
        return None
    checks: dict[str, Callable[[Any], bool]] = {}
    for name, property_schema in properties.items():
        if not isinstance(property_schema, dict) or not ({"type"} | _ANNOTATIONS).issuperset(property_schema):
            return None
        kind = property_schema.get("type")
        check = _SCALARS.get(kind) if isinstance(kind, str) else None
        if check is None:
            return None
        checks[name] = check
    needed = tuple(required)

    def fits(value: Any) -> bool:
        if not isinstance(value, dict) or any(name not in value for name in needed):
            return False
        for name, item in value.items():
            check = checks.get(name)
            if (check is None and closed is False) or (check is not None and not check(item)):
                return False
        return True

    return fits
