"""What every model client returns and the one method it has: a completion for a list of messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ToolCallRequest:
    """A tool the model asks to call, with the arguments it chose."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Usage:
    """Tokens spent on one completion (or, summed, by a tenant on a model)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    """A model's answer: text, or tool calls, and what it cost."""

    content: str
    tool_calls: tuple[ToolCallRequest, ...] = ()
    usage: Usage = Usage()


class ModelClient(Protocol):
    """A model behind a name in the definitions; ``timeout`` bounds the whole call, retries included."""

    async def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        json_schema: dict[str, Any] | None = None,
        timeout: float,
    ) -> Completion: ...
