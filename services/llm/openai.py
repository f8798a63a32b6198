"""Any server speaking the OpenAI Chat Completions protocol (vLLM, Ollama, LiteLLM, hosted APIs)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any

import httpx

from contracts.errors import DeadlineExceeded
from contracts.models import OpenAIModel
from services.llm.errors import ModelFailed, ModelRateLimited, ModelUnavailable
from services.llm.types import Completion, ToolCallRequest, Usage
from services.runtime.retry import RetryPolicy, call_with_retries

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Backoff between tries; the number of tries is each model's max_retries, the bound its timeout.
RETRY = RetryPolicy(initial_interval_s=0.1, multiplier=2.0, max_interval_s=5.0, jitter=0.5)
MAX_RETRY_AFTER_S = 30.0  # a server asking for longer is treated as asking for this


class OpenAIChatClient:
    """A Chat Completions endpoint; 429 and 5xx answers and lost connections are tried again."""

    def __init__(self, config: OpenAIModel, http: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.http = http or httpx.AsyncClient()
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.retry = replace(RETRY, max_attempts=config.max_retries + 1)

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
        """POST under the retry policy; ``timeout`` bounds every try and every pause between them."""
        deadline = time.monotonic() + timeout

        async def attempt() -> dict[str, Any]:
            left = max(0.0, deadline - time.monotonic())
            try:
                response = await self.http.post(self.url, json=body, headers=self.headers, timeout=left)
            except httpx.TimeoutException:
                raise DeadlineExceeded(f"model server did not answer within {timeout:.1f}s") from None
            except httpx.HTTPError as exc:
                raise ModelUnavailable(f"model server unreachable: {type(exc).__name__}") from None
            status = response.status_code
            if status == 200:
                try:
                    return response.json()
                except ValueError:
                    raise ModelFailed("model server answered with invalid JSON") from None
            if status == 429:
                raise ModelRateLimited("model server answered 429", _retry_after(response))
            if status in RETRY_STATUSES:
                raise ModelUnavailable(f"model server answered {status}", _retry_after(response))
            raise ModelFailed(f"model server answered {status}: {response.text[:200]}")

        return await call_with_retries(
            attempt, self.retry, retry_if=_worth_retrying, deadline=deadline, server_delay=_server_delay
        )

    async def aclose(self) -> None:
        await self.http.aclose()


def _worth_retrying(error: Exception) -> bool:
    return isinstance(error, ModelUnavailable | ModelRateLimited)


def _server_delay(error: Exception) -> float | None:
    return error.retry_after if isinstance(error, ModelUnavailable | ModelRateLimited) else None


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (the HTTP-date form is rare from model servers and ignored)."""
    try:
        return min(float(response.headers.get("retry-after", "")), MAX_RETRY_AFTER_S)
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
