"""Errors of a graph run, each with a stable wire code."""

from contracts.errors import DeadlineExceeded, Internal, NotFound


class GraphNotFound(NotFound):
    """The requested graph is not defined."""


class StepLimitExceeded(Internal):
    """The run took more steps than the graph allows (a cycle that did not end)."""


class RunTimedOut(DeadlineExceeded):
    """The run's own timeout or the request's deadline passed."""
