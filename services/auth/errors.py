"""Why a connection was denied; the reason is logged, never the token."""

from contracts.errors import ErrorCode, Unauthorized


class Denied(Unauthorized):
    """A tenant's connection refused by the auth service."""

    def __init__(self, message: str, *, tenant: str | None = None) -> None:
        super().__init__(message)
        # Set only when a trusted key signed the token: then the refusal goes to that tenant's
        # audit trail. An unverified claim is the attacker's to choose, so it is never used.
        self.tenant = tenant


class InvalidToken(Denied):
    """The application token is malformed, wrongly signed, expired or lacks a required claim."""


class ConnectionLimitReached(Denied):
    """A valid token, refused: the tenant already has as many connections as its policy allows
    (``connection.max_connections``). The reason starts with ``connection_limit``."""

    code = ErrorCode.LIMIT_EXCEEDED

    def __init__(self, tenant: str, limit: int, *, closed: bool = False) -> None:
        happened = "closed a connection admitted at the same moment as another" if closed else "refused"
        super().__init__(
            f"connection_limit: {happened}; the tenant already has its {limit} connections open "
            "(connection.max_connections)",
            tenant=tenant,
        )
        self.limit = limit


class InvalidCalloutRequest(Unauthorized):
    """The authorization request from the server could not be verified."""
