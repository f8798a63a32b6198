"""Syntax of the identifiers that end up inside subjects: tenant ids, names and run ids.

Each is checked with ``fullmatch`` (``$`` would accept a trailing newline) before any subject is
built, so that no dot, ``*`` or ``>`` can widen a subject or a permission.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, StringConstraints, WithJsonSchema

from contracts.errors import InvalidRequest

TENANT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# Tools, graphs, routes: one subject token, readable, never a wildcard or a dot.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class InvalidIdentifier(InvalidRequest):
    """An identifier that would be placed in a subject does not match its grammar."""


def _check(pattern: re.Pattern[str], what: str, value: object) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise InvalidIdentifier(f"invalid {what}: {shown!r}")
    return value


def validate_tenant_id(value: object) -> str:
    """Return ``value`` if it is a valid tenant id, else raise :class:`InvalidIdentifier`."""
    return _check(TENANT_ID_PATTERN, "tenant id", value)


def validate_name(value: object) -> str:
    """Return ``value`` if it is a valid tool, graph or route name."""
    return _check(NAME_PATTERN, "name", value)


def validate_run_id(value: object) -> str:
    """Return ``value`` if it is a valid run id."""
    return _check(RUN_ID_PATTERN, "run id", value)


def is_tenant_id(value: object) -> bool:
    return isinstance(value, str) and TENANT_ID_PATTERN.fullmatch(value) is not None


def _as_value_error(check):  # pydantic wants ValueError from validators
    def wrapped(value: object) -> str:
        try:
            return check(value)
        except InvalidIdentifier as exc:
            raise ValueError(str(exc)) from None

    return wrapped


TenantId = Annotated[str, AfterValidator(_as_value_error(validate_tenant_id))]
# Its JSON Schema states the grammar, so that an editor checks names in definitions files.
Name = Annotated[
    str,
    AfterValidator(_as_value_error(validate_name)),
    WithJsonSchema({"type": "string", "pattern": f"^{NAME_PATTERN.pattern}$"}),
]
RunId = Annotated[str, AfterValidator(_as_value_error(validate_run_id))]


# The same grammars checked inside pydantic-core (Rust regex, where ``$`` is the end of the text:
# no trailing newline passes), for the envelopes validated on every hop: no call back into Python
# per field. The error names the pattern instead of saying "invalid tenant id".
WireTenantId = Annotated[str, StringConstraints(pattern=f"^{TENANT_ID_PATTERN.pattern}$")]
WireName = Annotated[str, StringConstraints(pattern=f"^{NAME_PATTERN.pattern}$")]
WireRunId = Annotated[str, StringConstraints(pattern=f"^{RUN_ID_PATTERN.pattern}$")]
