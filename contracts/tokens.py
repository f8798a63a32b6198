"""Reading what a token says about its holder, without verifying it (the client side).

A client needs its own principal (the token's ``sub``) to address its requests: the subject it
may publish to names it (``contracts/subjects.py``). Nothing is trusted from this: the broker
grants the permission from the verified token, so a wrong answer here is only refused.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from contracts.errors import Unauthorized


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, not verified."""
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (IndexError, ValueError, binascii.Error):
        raise Unauthorized("the token is not a JWT") from None
    if not isinstance(claims, dict):
        raise Unauthorized("the token is not a JWT")
    return claims


def scopes_in(claims: dict[str, Any]) -> frozenset[str]:
    """The scopes and roles a token's claims carry (``scope``, ``scp``, ``roles``, ``groups``)."""
    found: set[str] = set()
    for name in ("scope", "scp", "roles", "groups"):
        value = claims.get(name)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(str(item) for item in value)
    return frozenset(found)


def subject_of(token: str) -> str:
    """The ``sub`` claim of a token: the principal it names."""
    subject = unverified_claims(token).get("sub")
    if not isinstance(subject, str) or not subject:
        raise Unauthorized("the token has no 'sub' claim")
    return subject
