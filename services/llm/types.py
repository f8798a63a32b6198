"""What every model client returns and the one method it has: a completion for a list of messages."""

from __future__ import annotations

import json
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


def assistant_message(completion: Completion) -> dict[str, Any]:
    """An answer with tool calls as the Chat Completions protocol keeps it in the history (each
    call's result must follow it, as a ``tool`` message with its ``tool_call_id``)."""
    return {
        "role": "assistant",
        "content": completion.content or None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for call in completion.tool_calls
        ],
    }


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
