"""The deterministic scripted model: the offline default, and what tests and examples run on."""

from __future__ import annotations

import json
from typing import Any

from contracts.agents import HANDED_OFF, HANDOFF_PREFIX
from contracts.expressions import render
from contracts.models import ScriptedModel
from services.llm.types import Completion, ToolCallRequest, Usage


def _latest_input(messages: list[dict[str, Any]]) -> str:
    """The latest user message or tool result (rules read it); an agent just handed the
    conversation reads the user's latest message."""
    handoffs = {
        call.get("id")
        for m in messages
        if m.get("role") == "assistant"
        for call in m.get("tool_calls") or []
        if str((call.get("function") or {}).get("name", "")).startswith(HANDOFF_PREFIX)
    }

    def handed(message: dict[str, Any]) -> bool:  # a handoff that happened (not one refused)
        return message.get("tool_call_id") in handoffs and HANDED_OFF in str(message.get("content") or "")

    after_handoff = bool(messages) and messages[-1].get("role") == "tool" and handed(messages[-1])
    for message in reversed(messages):
        role = message.get("role")
        if role == "user" or (role == "tool" and not after_handoff and not handed(message)):
            return message.get("content") or ""
    return ""


def approximate_tokens(text: str) -> int:
    """About four characters a token: enough for metering a model that has no tokenizer."""
    return max(1, len(text) // 4) if text else 0


class ScriptedModelClient:
    """Answers by rules from the definition: same messages, same answer, no network.

    Rules match the latest user message or tool result (case-insensitive substrings).

    A rule's ``reply`` is text, an object (returned as JSON text, for output schemas),
    ``{"tool_call": {"name": ..., "arguments": {...}}}`` to ask for a tool, or
    ``{"tool_calls": [...], "content": ...}`` to ask for several at once (tools, and handoffs:
    ``transfer_to_<agent>``).

    The result of a handoff (a tool message answering a ``transfer_to_...`` call) is not an input:
    the agent taking over reads the message before it, so its rules match what the user said.

    Text answers given as ``{"template": "..."}`` and the string arguments of tool calls are
    templates (``{message}``: the user's latest message; ``{result.order.id}``: a field of the
    latest tool result), so a scripted conversation can carry what was said and found.
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
        latest = _latest_input(messages)
        reply = next((rule.reply for rule in self.script.rules if rule.matches(latest)), self.script.default)
        scope = _scope(messages)
        prompt_tokens = sum(approximate_tokens(str(m.get("content") or "")) for m in messages)
        if isinstance(reply, dict) and (
            isinstance(reply.get("tool_call"), dict) or isinstance(reply.get("tool_calls"), list)
        ):
            calls = reply["tool_calls"] if isinstance(reply.get("tool_calls"), list) else [reply["tool_call"]]
            asked = len([m for m in messages if m.get("role") == "assistant"])
            requests = tuple(
                ToolCallRequest(
                    id=f"call_{asked}_{index}",
                    name=str(call.get("name")),
                    arguments={k: _filled(v, scope) for k, v in dict(call.get("arguments") or {}).items()},
                )
                for index, call in enumerate(calls)
                if isinstance(call, dict)
            )
            content = reply.get("content") if isinstance(reply.get("content"), str) else ""
            return Completion(content=content, tool_calls=requests, usage=Usage(prompt_tokens, len(requests)))
        if isinstance(reply, dict) and isinstance(reply.get("template"), str):
            content = render(reply["template"], scope)
        else:
            content = reply if isinstance(reply, str) else json.dumps(reply)
        return Completion(content=content, usage=Usage(prompt_tokens, approximate_tokens(content)))


def _scope(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """What templates read: the user's latest message and the latest tool result (parsed)."""
    message = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    result: Any = None
    for m in reversed(messages):
        if m.get("role") == "user":
            break
        if m.get("role") == "tool" and HANDED_OFF not in str(m.get("content") or ""):
            try:
                result = json.loads(m.get("content") or "null")
            except ValueError:
                result = m.get("content")
            break
    return {"message": message, "result": result}


def _filled(value: Any, scope: dict[str, Any]) -> Any:
    return render(value, scope) if isinstance(value, str) and "{" in value else value
