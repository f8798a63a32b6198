"""The deterministic scripted model: the offline default, and what tests and examples run on."""

from __future__ import annotations

import json
from typing import Any

from contracts.models import ScriptedModel
from services.llm.types import Completion, ToolCallRequest, Usage


def approximate_tokens(text: str) -> int:
    """About four characters a token: enough for metering a model that has no tokenizer."""
    return max(1, len(text) // 4) if text else 0


class ScriptedModelClient:
    """Answers by rules from the definition: same messages, same answer, no network.

    Rules match the latest user message or tool result (case-insensitive substrings).

    A rule's ``reply`` is text, an object (returned as JSON text, for output schemas), or
    ``{"tool_call": {"name": ..., "arguments": {...}}}`` to ask for a tool.
    """

    def __init__(self, script: ScriptedModel) -> None:
        self.script = script

    async def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        json_schema: dict[str, Any] | None = None,
        timeout: float,
    ) -> Completion:
        # Rules read the latest input: the user's message, or a tool's result in an agent loop.
        latest = next((m.get("content") or "" for m in reversed(messages) if m.get("role") in ("user", "tool")), "")
        reply = next((rule.reply for rule in self.script.rules if rule.matches(latest)), self.script.default)
        prompt_tokens = sum(approximate_tokens(str(m.get("content") or "")) for m in messages)
        if isinstance(reply, dict) and isinstance(reply.get("tool_call"), dict):
            call = reply["tool_call"]
            request = ToolCallRequest(
                id="call_0", name=str(call.get("name")), arguments=dict(call.get("arguments") or {})
            )
            return Completion(content="", tool_calls=(request,), usage=Usage(prompt_tokens, 1))
        content = reply if isinstance(reply, str) else json.dumps(reply)
        return Completion(content=content, usage=Usage(prompt_tokens, approximate_tokens(content)))
