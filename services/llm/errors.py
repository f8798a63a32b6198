"""Errors of model calls. The wire codes are the shared ones: a failing or unusable model server is
``internal``, one that asks to slow down is ``rate_limited``."""

from __future__ import annotations

from contracts.errors import Internal, RateLimited


class ModelFailed(Internal):
    """The model server failed or answered something unusable."""


class ModelUnavailable(ModelFailed):
    """The model server was unreachable or answered 5xx: worth another try, after ``retry_after``
    seconds when the server said so."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelRateLimited(RateLimited):
    """The model server answered 429; ``retry_after`` is its Retry-After, when it gave one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
