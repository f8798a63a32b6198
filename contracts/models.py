"""Model definitions: the deterministic scripted model (the offline default) and any
OpenAI-compatible Chat Completions server."""

from __future__ import annotations

from pydantic import Field, JsonValue, model_validator

from contracts.definitions_base import Definition
from contracts.tenants import Name


class ScriptedRule(Definition):
    """Answer ``reply`` when the latest user message or tool result contains ``contains``
    (case-insensitive)."""

    contains: str | list[str] = Field(min_length=1, description="Text (or any of several) to look for.")
    reply: JsonValue = Field(description="The answer: text, or JSON for a node or step with an output schema.")

    def matches(self, text: str) -> bool:
        needles = [self.contains] if isinstance(self.contains, str) else self.contains
        lowered = text.lower()
        return any(needle.lower() in lowered for needle in needles)


class ScriptedModel(Definition):
    """Rules tried in order; the first that matches answers, else ``default``."""

    rules: list[ScriptedRule] = Field(default_factory=list, description="Tried in order.")
    default: JsonValue = Field(default="", description="The answer when no rule matches.")


class OpenAIModel(Definition):
    """An OpenAI-compatible Chat Completions endpoint (vLLM, Ollama, LiteLLM, a hosted API)."""

    base_url: str = Field(description="The API's base URL, e.g. `http://localhost:11434/v1`.")
    model: str = Field(description="The model's name on that server.")
    api_key_env: str | None = Field(
        default=None, description="The environment variable that holds the API key (never the key itself)."
    )
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="Seconds one call may take.")
    max_retries: int = Field(default=2, ge=0, le=10, description="Retries of a call that failed on the way.")
    temperature: float | None = Field(default=0.0, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)


class ModelDefinition(Definition):
    """A model: exactly one of ``scripted`` (deterministic, offline) or ``openai`` (any Chat Completions server)."""

    name: Name
    description: str = ""
    scripted: ScriptedModel | None = Field(default=None, description="Canned answers by rule.")
    openai: OpenAIModel | None = Field(default=None, description="An OpenAI-compatible server.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelDefinition:
        if (self.scripted is None) == (self.openai is None):
            raise ValueError(f"model {self.name!r} needs exactly one of 'scripted' or 'openai'")
        return self
