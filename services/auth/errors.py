"""Why a connection was denied; the reason is logged, never the token."""

from contracts.errors import Unauthorized


class InvalidToken(Unauthorized):
    """The application token is malformed, wrongly signed, expired or lacks a required claim."""

    def __init__(self, message: str, *, tenant: str | None = None) -> None:
        super().__init__(message)
        # Set only when a trusted key signed the token: then the refusal goes to that tenant's
        # audit trail. An unverified claim is the attacker's to choose, so it is never used.
        self.tenant = tenant


class InvalidCalloutRequest(Unauthorized):
    """The authorization request from the server could not be verified."""
