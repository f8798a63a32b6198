"""Model clients: the deterministic scripted model (offline default) and an OpenAI-compatible
Chat Completions client over httpx. Token usage is metered per tenant by :class:`UsageMeter`."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from contracts.errors import DeadlineExceeded, Internal, NotFound, RateLimited
from contracts.models import ModelDefinition, OpenAIModel, ScriptedModel

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ModelFailed(Internal):
    """The model server failed or answered something unusable."""


@dataclass(frozen=True)
class ToolCallRequest:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    content: str
    tool_calls: tuple[ToolCallRequest, ...] = ()
    usage: Usage = Usage()


class ModelClient(Protocol):
    async def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        json_schema: dict[str, Any] | None = None,
        timeout: float,
    ) -> Completion: ...


def _approximate_tokens(text: str) -> int:
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
        prompt_tokens = sum(_approximate_tokens(str(m.get("content") or "")) for m in messages)
        if isinstance(reply, dict) and isinstance(reply.get("tool_call"), dict):
            call = reply["tool_call"]
            request = ToolCallRequest(
                id="call_0", name=str(call.get("name")), arguments=dict(call.get("arguments") or {})
            )
            return Completion(content="", tool_calls=(request,), usage=Usage(prompt_tokens, 1))
        content = reply if isinstance(reply, str) else json.dumps(reply)
        return Completion(content=content, usage=Usage(prompt_tokens, _approximate_tokens(content)))


class OpenAIChatClient:
    """Any server speaking the OpenAI Chat Completions protocol (vLLM, Ollama, LiteLLM, hosted)."""

    def __init__(self, config: OpenAIModel, http: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.http = http or httpx.AsyncClient()
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def complete(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        json_schema: dict[str, Any] | None = None,
        timeout: float,
    ) -> Completion:
        body: dict[str, Any] = {"model": self.config.model, "messages": messages}
        if self.config.temperature is not None:
            body["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            body["max_tokens"] = self.config.max_tokens
        if tools:
            body["tools"] = [{"type": "function", "function": tool} for tool in tools]
        if json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": json_schema, "strict": False},
            }
        data = await self._post(body, min(timeout, self.config.timeout_s))
        return _parse_completion(data)

    async def _post(self, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in range(self.config.max_retries + 1):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            retry_after: float | None = None
            try:
                response = await self.http.post(url, json=body, headers=self.headers, timeout=remaining)
            except httpx.TimeoutException:
                raise DeadlineExceeded(f"model server did not answer within {timeout:.1f}s") from None
            except httpx.HTTPError as exc:
                failure: Exception = ModelFailed(f"model server unreachable: {type(exc).__name__}")
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise ModelFailed("model server answered with invalid JSON") from None
                if response.status_code not in RETRY_STATUSES:
                    raise ModelFailed(f"model server answered {response.status_code}: {response.text[:200]}")
                failure = (RateLimited if response.status_code == 429 else ModelFailed)(
                    f"model server answered {response.status_code}"
                )
                retry_after = _retry_after(response)
            if attempt == self.config.max_retries:
                raise failure
            # Exponential backoff with jitter, honouring Retry-After, never past the deadline.
            delay = retry_after if retry_after is not None else (0.1 * 2**attempt) * (0.5 + random.random())
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        raise DeadlineExceeded(f"model server did not answer within {timeout:.1f}s")

    async def aclose(self) -> None:
        await self.http.aclose()


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(float(response.headers.get("retry-after", "")), 30.0)
    except ValueError:
        return None


def _parse_completion(data: dict[str, Any]) -> Completion:
    try:
        message = data["choices"][0]["message"]
        calls = tuple(
            ToolCallRequest(
                id=call.get("id", ""),
                name=call["function"]["name"],
                arguments=json.loads(call["function"].get("arguments") or "{}"),
            )
            for call in message.get("tool_calls") or []
        )
        usage = data.get("usage") or {}
        return Completion(
            content=message.get("content") or "",
            tool_calls=calls,
            usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
        )
    except (KeyError, IndexError, TypeError, ValueError):
        raise ModelFailed("model server answered in an unexpected shape") from None


@dataclass
class UsageMeter:
    """Tokens used per tenant and model (per process; reported in run events and logs)."""

    totals: dict[tuple[str, str], Usage] = field(default_factory=lambda: defaultdict(Usage))

    def record(self, tenant: str, model: str, usage: Usage) -> None:
        current = self.totals[(tenant, model)]
        self.totals[(tenant, model)] = Usage(
            current.prompt_tokens + usage.prompt_tokens, current.completion_tokens + usage.completion_tokens
        )

    def for_tenant(self, tenant: str) -> dict[str, int]:
        return {model: usage.total_tokens for (owner, model), usage in self.totals.items() if owner == tenant}


class ModelRegistry:
    """The model clients of the definitions, by name."""

    def __init__(self, models: dict[str, ModelDefinition], http: httpx.AsyncClient | None = None) -> None:
        self.http = http or httpx.AsyncClient()
        self.clients: dict[str, ModelClient] = {
            name: ScriptedModelClient(d.scripted) if d.scripted else OpenAIChatClient(d.openai, self.http)  # type: ignore[arg-type]
            for name, d in models.items()
        }
        self.meter = UsageMeter()

    def get(self, name: str) -> ModelClient:
        try:
            return self.clients[name]
        except KeyError:
            raise NotFound(f"unknown model {name!r}") from None

    async def aclose(self) -> None:
        await self.http.aclose()
