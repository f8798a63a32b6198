"""Errors of a graph run, each with a stable wire code."""

from contracts.definitions_base import DefinitionError
from contracts.errors import DeadlineExceeded, InvalidRequest, LimitExceeded, NotFound


class GraphNotFound(NotFound):
    """The requested graph is not defined."""


class StepLimitExceeded(LimitExceeded):
    """The run took more steps than the graph allows."""


class VisitLimitExceeded(LimitExceeded):
    """A node in a cycle was entered more often than its ``max_visits``."""


class TurnLimitExceeded(LimitExceeded):
    """An agent node's model was still asking for tools after ``max_turns`` turns."""


class DepthLimitExceeded(LimitExceeded):
    """Subgraphs were nested deeper than the executor allows."""


# A join left waiting is not Corral failing (internal) nor a bound being reached (limit): the run
# did what the graph says, and the graph routes a branch away from a join that waits for all of
# them. So it is the definition's problem, as the definition errors are (``invalid_request``, not
# retryable: the same input takes the same path); the message names the join and missing branches.
class JoinIncomplete(DefinitionError):
    """A join waits for a branch that can no longer arrive (its path went elsewhere)."""


class ReducerFailed(DefinitionError):
    """The graph's reducer for a state key cannot combine the outputs written to it (say ``sum``
    of text and a number): the definition's reducer and its nodes' outputs do not fit together."""


class RunTimedOut(DeadlineExceeded):
    """The run's own timeout or the request's deadline passed."""


class NodeTimedOut(DeadlineExceeded):
    """One node took longer than its ``timeout_s``."""


class InvalidModelOutput(InvalidRequest):
    """A model's answer did not match the node's output schema."""
