"""The base of every definition model: frozen, unknown fields refused."""

from pydantic import BaseModel, ConfigDict

from contracts.errors import InvalidRequest


class Definition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DefinitionError(InvalidRequest):
    """A definition is invalid or refers to something that does not exist."""
