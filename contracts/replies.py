"""Reading a reply: the output of a result envelope, or the typed error an error envelope carries.

Shared by the services and the Python client (which depends on ``contracts`` and the connection
only), so it is pure: no I/O, no logging.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json

from contracts.envelope import ErrorInfo, Kind
from contracts.errors import Internal, error_for


def decode_reply(data: bytes) -> Any:
    """The output of a result envelope, or raise the typed error an error envelope carries.

    Replies are parsed as plain JSON with a check of the two fields used, not a full envelope
    validation: they come from Corral's own services and this runs once per hop.
    """
    try:
        reply = from_json(data)  # pydantic-core's parser: half the time of json.loads here
        kind = reply["kind"]
        payload = reply["payload"]
        if kind == Kind.ERROR:
            info = ErrorInfo.model_validate(payload)
        elif kind == Kind.RESULT and isinstance(payload, dict):
            return payload.get("output")
        else:
            raise ValueError(kind)
    except (ValueError, KeyError, TypeError, ValidationError):
        raise Internal("unreadable reply") from None
    error = error_for(info.code, info.message)
    error.remote = True  # raised by the service that replied (which already reported it)
    raise error
