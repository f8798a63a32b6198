"""Model definitions: the deterministic scripted model (the offline default) and any
OpenAI-compatible Chat Completions server."""

from __future__ import annotations

from pydantic import Field, JsonValue, model_validator

from contracts.definitions_base import Definition
from contracts.tenants import Name


class ScriptedRule(Definition):
    """Answer ``reply`` when the latest user message or tool result contains ``contains``
    (case-insensitive)."""

    contains: str | list[str] = Field(min_length=1)
    reply: JsonValue

    def matches(self, text: str) -> bool:
        needles = [self.contains] if isinstance(self.contains, str) else self.contains
        lowered = text.lower()
        return any(needle.lower() in lowered for needle in needles)


class ScriptedModel(Definition):
    """Rules tried in order; the first that matches answers, else ``default``."""

    rules: list[ScriptedRule] = Field(default_factory=list)
    default: JsonValue = ""


class OpenAIModel(Definition):
    """An OpenAI-compatible Chat Completions endpoint (vLLM, Ollama, LiteLLM, a hosted API)."""

    base_url: str  # e.g. http://localhost:11434/v1
    model: str
    api_key_env: str | None = None  # the name of the environment variable holding the key
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    max_retries: int = Field(default=2, ge=0, le=10)
    temperature: float | None = Field(default=0.0, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)


class ModelDefinition(Definition):
    name: Name
    description: str = ""
    scripted: ScriptedModel | None = None
    openai: OpenAIModel | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelDefinition:
        if (self.scripted is None) == (self.openai is None):
            raise ValueError(f"model {self.name!r} needs exactly one of 'scripted' or 'openai'")
        return self
