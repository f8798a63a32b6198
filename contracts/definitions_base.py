"""The base of every definition model (frozen, unknown fields refused), and how problems with
definitions are reported: each at a path into a file's data, so a loader can name its line."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from contracts.errors import InvalidRequest

# A path into a definitions file's data: mapping keys and list indices (``graphs, 0, nodes, a``).
Location = tuple[str | int, ...]


class Definition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the definitions, at ``where`` (relative to what reports it)."""

    where: Location
    message: str
    # Which of the files given to :meth:`Catalog.merge <contracts.definitions.Catalog.merge>`.
    file: int | None = None
    # The name this problem says is unknown: a loader that could not read the definition of that
    # name (it has problems of its own) leaves this one out rather than report it twice.
    unknown: str | None = None

    def within(self, *prefix: str | int) -> Problem:
        return Problem((*prefix, *self.where), self.message, self.file, self.unknown)


class Problems(ValueError):
    """Raised by a definition's validator: several problems, each at a path inside the definition.

    A ValueError, so pydantic reports it as the definition's error; pydantic keeps the exception
    (``ctx["error"]``), so a loader can point each problem at its own key and line.
    """

    def __init__(self, what: str, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(f"{what}: " + "; ".join(problem.message for problem in self.problems))


class DefinitionError(InvalidRequest):
    """A definition is invalid or refers to something that does not exist."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``candidates``, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
