"""Errors of a graph run, each with a stable wire code."""

from contracts.errors import DeadlineExceeded, Internal, InvalidRequest, NotFound


class GraphNotFound(NotFound):
    """The requested graph is not defined."""


class StepLimitExceeded(Internal):
    """The run took more steps than the graph allows."""


class VisitLimitExceeded(Internal):
    """A node in a cycle was entered more often than its ``max_visits``."""


class JoinIncomplete(Internal):
    """A join waits for a branch that can no longer arrive (its path went elsewhere)."""


class RunTimedOut(DeadlineExceeded):
    """The run's own timeout or the request's deadline passed."""


class NodeTimedOut(DeadlineExceeded):
    """One node took longer than its ``timeout_s``."""


class InvalidModelOutput(InvalidRequest):
    """A model's answer did not match the node's output schema."""
