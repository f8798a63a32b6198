"""Model clients: the scripted model, and the Chat Completions client against a real local server."""

from __future__ import annotations

import json
import threading

import pytest

from contracts.errors import DeadlineExceeded, RateLimited
from contracts.models import ModelDefinition, OpenAIModel, ScriptedModel
from services.llm import ModelFailed, ModelRegistry, OpenAIChatClient, ScriptedModelClient, Usage
from tests.support.http import Reply, http_server

SCRIPT = ScriptedModel.model_validate(
    {
        "rules": [
            {"contains": ["refund", "money back"], "reply": {"label": "billing"}},
            {"contains": "crash", "reply": "It is a bug."},
            {"contains": "weather", "reply": {"tool_call": {"name": "forecast", "arguments": {"city": "Oslo"}}}},
        ],
        "default": "I am not sure.",
    }
)


def completion(content="hello", tool_calls=None, prompt=11, completion_tokens=3):
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "choices": [{"message": message}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens},
    }


async def test_the_scripted_model_answers_by_its_first_matching_rule():
    model = ScriptedModelClient(SCRIPT)
    answer = await model.complete([{"role": "user", "content": "I want my MONEY BACK"}], timeout=1)
    assert json.loads(answer.content) == {"label": "billing"}
    assert (await model.complete([{"role": "user", "content": "it crashed"}], timeout=1)).content == "It is a bug."
    assert (await model.complete([{"role": "user", "content": "hi"}], timeout=1)).content == "I am not sure."


async def test_the_scripted_model_can_ask_for_a_tool_and_reports_usage():
    answer = await ScriptedModelClient(SCRIPT).complete([{"role": "user", "content": "weather?"}], timeout=1)
    assert answer.tool_calls[0].name == "forecast" and answer.tool_calls[0].arguments == {"city": "Oslo"}
    assert answer.usage.prompt_tokens > 0


async def test_the_scripted_model_is_deterministic():
    model = ScriptedModelClient(SCRIPT)
    answers = {(await model.complete([{"role": "user", "content": "refund"}], timeout=1)).content for _ in range(10)}
    assert len(answers) == 1


def client_for(url, **config):
    return OpenAIChatClient(OpenAIModel(base_url=url + "/v1", model="m", **config))


async def test_chat_completions_are_sent_as_the_protocol_says_and_parsed(monkeypatch):
    monkeypatch.setenv("TEST_MODEL_KEY", "sk-test")
    with http_server() as server:
        server.replies.append(Reply(body=completion("hi there")))
        client = client_for(server.url, api_key_env="TEST_MODEL_KEY")
        answer = await client.complete(
            [{"role": "user", "content": "hello"}],
            json_schema={"type": "object"},
            tools=[{"name": "f", "parameters": {"type": "object"}}],
            timeout=5,
        )
        await client.aclose()
    request = server.received[0]
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    body = json.loads(request.body)
    assert body["model"] == "m" and body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert body["response_format"]["type"] == "json_schema"
    assert answer.content == "hi there" and answer.usage == Usage(11, 3)


async def test_tool_calls_in_the_answer_are_parsed():
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
    with http_server() as server:
        server.replies.append(Reply(body=completion(None, tool_calls=[call])))
        client = client_for(server.url)
        answer = await client.complete([{"role": "user", "content": "x"}], timeout=5)
        await client.aclose()
    assert answer.tool_calls[0].name == "lookup" and answer.tool_calls[0].arguments == {"q": "x"}


async def test_429_and_5xx_are_retried_with_backoff_then_succeed():
    with http_server() as server:
        server.replies.extend(
            [
                Reply(status=429, body={}, headers={"retry-after": "0"}),
                Reply(status=503, body={}),
                Reply(body=completion("finally")),
            ]
        )
        client = client_for(server.url, max_retries=2)
        answer = await client.complete([{"role": "user", "content": "x"}], timeout=5)
        await client.aclose()
    assert answer.content == "finally" and len(server.received) == 3


async def test_retries_give_up_with_a_typed_error():
    with http_server() as server:
        server.replies.extend([Reply(status=429, body={}, headers={"retry-after": "0"})] * 2)
        client = client_for(server.url, max_retries=1)
        with pytest.raises(RateLimited):
            await client.complete([{"role": "user", "content": "x"}], timeout=5)
        await client.aclose()


async def test_client_errors_are_not_retried():
    with http_server() as server:
        server.replies.append(Reply(status=400, body={"error": "bad"}))
        client = client_for(server.url, max_retries=3)
        with pytest.raises(ModelFailed, match="400"):
            await client.complete([{"role": "user", "content": "x"}], timeout=5)
        await client.aclose()
    assert len(server.received) == 1


async def test_a_slow_model_server_times_out():
    stuck = threading.Event()
    with http_server() as server:
        server.replies.append(Reply(wait=stuck))
        client = client_for(server.url, max_retries=0)
        try:
            with pytest.raises(DeadlineExceeded):
                await client.complete([{"role": "user", "content": "x"}], timeout=0.2)
        finally:
            stuck.set()
            await client.aclose()


async def test_an_answer_in_an_unexpected_shape_is_a_typed_error():
    with http_server() as server:
        server.replies.append(Reply(body={"nothing": "here"}))
        client = client_for(server.url)
        with pytest.raises(ModelFailed, match="unexpected shape"):
            await client.complete([{"role": "user", "content": "x"}], timeout=5)
        await client.aclose()


async def test_usage_is_metered_per_tenant_and_model():
    registry = ModelRegistry({"s": ModelDefinition(name="s", scripted=SCRIPT)})
    registry.meter.record("acme", "s", Usage(10, 5))
    registry.meter.record("acme", "s", Usage(1, 1))
    registry.meter.record("globex", "s", Usage(100, 0))
    assert registry.meter.for_tenant("acme") == {"s": 17}
    assert registry.meter.for_tenant("globex") == {"s": 100}
    await registry.aclose()
