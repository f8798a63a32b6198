"""Tool arguments as a model or caller sent them: tenant fields removed, schema checked.

The tenant is the runtime's to give. A ``tenant_id`` (or a configured alias) anywhere in the
arguments is an attempt to act as someone else: it is removed, and the caller is told so the
attempt can be logged and audited. Keys are matched as a lenient server would bind them
(:func:`canonical_key`): ``TENANT_ID``, ``Tenant-Id`` and ``tenantid`` are all ``tenant_id``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import jsonschema

from contracts.definitions_base import DefinitionError
from contracts.errors import InvalidRequest
from services.runtime.json_schema import quick_check

TENANT_KEYS = frozenset({"tenant_id", "tenant", "tenantId"})
_NESTED = (dict, list)


def canonical_key(key: str) -> str:
    """``key`` as a lenient server might match it: compatibility-normalised (fullwidth letters are
    letters), case-folded, and with everything but letters and digits dropped, so ``Tenant-ID``,
    ``tenant.id`` and ``tenantId`` are all ``tenantid``."""
    # Argument names repeat, so short ones are cached; long ones (a caller's choice) are not kept.
    return _canonical_short(key) if len(key) <= 64 else _canonical(key)


def _canonical(key: str) -> str:
    folded = unicodedata.normalize("NFKC", key).casefold()
    return "".join(char for char in folded if char.isalnum())


_canonical_short = lru_cache(maxsize=4096)(_canonical)


@lru_cache(maxsize=64)
def _canonical_keys(keys: frozenset[str]) -> frozenset[str]:
    return frozenset(canonical_key(key) for key in keys)


def is_tenant_key(key: object, keys: frozenset[str] = TENANT_KEYS) -> bool:
    """Whether ``key`` names the tenant (one of ``keys``) in any spelling a server might accept."""
    return isinstance(key, str) and (key in keys or canonical_key(key) in _canonical_keys(keys))


def strip_tenant(arguments: dict[str, Any], keys: frozenset[str] = TENANT_KEYS) -> tuple[dict[str, Any], list[str]]:
    """A copy of ``arguments`` without tenant keys (in any spelling, see :func:`canonical_key`) at
    any depth, and the paths that were removed."""
    removed: list[str] = []
    if not any(is_tenant_key(key, keys) or isinstance(value, _NESTED) for key, value in arguments.items()):
        return dict(arguments), removed  # flat and clean: the common case, without the walk

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            kept = {}
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if is_tenant_key(key, keys):
                    removed.append(where)
                else:
                    kept[key] = clean(item, where)
            return kept
        if isinstance(value, list):
            return [clean(item, f"{path}[{index}]") for index, item in enumerate(value)]
        return value

    return clean(arguments, ""), removed


class ArgumentsValidator:
    """A tool's compiled JSON schema, with a quick check in front for the common shape.

    Most tool schemas are a flat object of scalar properties. For those, a few ``isinstance``
    checks decide what ``jsonschema`` would (a fifth of a tool call's own cost, measured); the
    quick check only ever accepts, so anything it does not accept is decided by ``jsonschema``.
    """

    __slots__ = ("quick", "validator")

    def __init__(self, validator: jsonschema.protocols.Validator, quick: Callable[[dict[str, Any]], bool] | None):
        self.validator = validator
        self.quick = quick

    def is_valid(self, arguments: dict[str, Any]) -> bool:
        return (self.quick is not None and self.quick(arguments)) or self.validator.is_valid(arguments)

    def iter_errors(self, arguments: dict[str, Any]) -> Any:
        return self.validator.iter_errors(arguments)


def compile_schema(schema: dict[str, Any], owner: str) -> ArgumentsValidator:
    """Check a JSON schema once and return its validator (``jsonschema.validate`` re-checks the
    schema on every call: about 70x the cost of a compiled validator, measured here)."""
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise DefinitionError(f"{owner} has an invalid JSON schema: {exc.message[:200]}") from None
    return ArgumentsValidator(cls(schema), quick_check(schema))


def check_arguments(arguments: dict[str, Any], validator: ArgumentsValidator, tool: str) -> None:
    """Validate arguments against the tool's JSON schema before anything is called."""
    if validator.is_valid(arguments):  # the common case, and several times cheaper than iter_errors
        return
    error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "arguments"
        raise InvalidRequest(f"invalid arguments for tool {tool!r} at {where}: {error.message[:200]}")
