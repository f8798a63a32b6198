"""Model clients, a library shared by the services that call models (graph, workflow and swarm).

The deterministic scripted model is the offline default; :class:`OpenAIChatClient` speaks the
OpenAI Chat Completions protocol over httpx (vLLM, Ollama, LiteLLM, hosted APIs), retrying under
the runtime's retry policy within the call's timeout. :class:`ModelRegistry` holds a catalog's
clients by name and a :class:`UsageMeter` of tokens per tenant.

This package imports ``contracts``, httpx and ``services.runtime.retry`` only, never a service.
"""

from services.llm.errors import ModelFailed, ModelRateLimited, ModelUnavailable
from services.llm.metering import MODEL_TOKENS, MODEL_TOKENS_HELP, UsageMeter
from services.llm.openai import OpenAIChatClient
from services.llm.registry import ModelRegistry
from services.llm.scripted import ScriptedModelClient
from services.llm.types import Completion, ModelClient, ToolCallRequest, Usage, assistant_message

__all__ = [
    "MODEL_TOKENS",
    "MODEL_TOKENS_HELP",
    "Completion",
    "ModelClient",
    "ModelFailed",
    "ModelRateLimited",
    "ModelRegistry",
    "ModelUnavailable",
    "OpenAIChatClient",
    "ScriptedModelClient",
    "ToolCallRequest",
    "Usage",
    "UsageMeter",
    "assistant_message",
]
