"""Why a connection was denied; the reason is logged, never the token."""

from contracts.errors import ErrorCode, Unauthorized
from services.runtime.tokens import Denied, InvalidToken

__all__ = ["ConnectionLimitReached", "Denied", "InvalidCalloutRequest", "InvalidToken", "SubscriptionLimitReached"]


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


class SubscriptionLimitReached(Denied):
    """A tenant connection was closed: it held more subscriptions than its tenant's policy allows
    (``connection.max_subscriptions``), which the broker does not enforce for callout users. The
    reason starts with ``subscription_limit``."""

    code = ErrorCode.LIMIT_EXCEEDED

    def __init__(self, tenant: str, held: int, limit: int) -> None:
        super().__init__(
            f"subscription_limit: closed a connection holding {held} subscriptions; the tenant allows "
            f"{limit} per connection (connection.max_subscriptions)",
            tenant=tenant,
        )
        self.limit = limit


class InvalidCalloutRequest(Unauthorized):
    """The authorization request from the server could not be verified."""
