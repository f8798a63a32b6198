"""Why a connection was denied; the reason is logged, never the token."""

from contracts.errors import Unauthorized


class InvalidToken(Unauthorized):
    """The application token is malformed, wrongly signed, expired or lacks a required claim."""


class InvalidCalloutRequest(Unauthorized):
    """The authorization request from the server could not be verified."""
