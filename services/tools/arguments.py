"""Tool arguments as a model or caller sent them: tenant fields removed, schema checked.

The tenant is the runtime's to give. A ``tenant_id`` (or a configured alias) anywhere in the
arguments is an attempt to act as someone else: it is removed, and the caller is told so the
attempt can be logged and audited.
"""

from __future__ import annotations

from typing import Any

import jsonschema

from contracts.errors import InvalidRequest

TENANT_KEYS = frozenset({"tenant_id", "tenant", "tenantId"})


def strip_tenant(arguments: dict[str, Any], keys: frozenset[str] = TENANT_KEYS) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``arguments`` without tenant keys at any depth, and the paths that were removed."""
    removed: list[str] = []

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            kept = {}
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if key in keys:
                    removed.append(where)
                else:
                    kept[key] = clean(item, where)
            return kept
        if isinstance(value, list):
            return [clean(item, f"{path}[{index}]") for index, item in enumerate(value)]
        return value

    return clean(arguments, ""), removed


def check_arguments(arguments: dict[str, Any], schema: dict[str, Any], tool: str) -> None:
    """Validate arguments against the tool's JSON schema before anything is called."""
    try:
        jsonschema.validate(arguments, schema)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "arguments"
        raise InvalidRequest(f"invalid arguments for tool {tool!r} at {where}: {exc.message[:200]}") from None
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(f"tool {tool!r} has an invalid parameter schema: {exc.message[:200]}") from None
