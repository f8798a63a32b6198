"""The model clients of a catalog's definitions, by name, sharing one HTTP client and one meter."""

from __future__ import annotations

import httpx

from contracts.errors import NotFound
from contracts.models import ModelDefinition
from services.llm.metering import UsageMeter
from services.llm.openai import OpenAIChatClient
from services.llm.scripted import ScriptedModelClient
from services.llm.types import ModelClient
from services.runtime import tracing


class ModelRegistry:
    """The model clients of the definitions, by name."""

    def __init__(self, models: dict[str, ModelDefinition], http: httpx.AsyncClient | None = None) -> None:
        self.http = http or httpx.AsyncClient()
        self.clients: dict[str, ModelClient] = {
            name: ScriptedModelClient(d.scripted) if d.scripted else OpenAIChatClient(d.openai, self.http)  # type: ignore[arg-type]
            for name, d in models.items()
        }
        # What a model call's span names (GenAI conventions): the provider and its model's name.
        self.described: dict[str, tuple[str, str]] = {
            name: ("openai", d.openai.model) if d.openai else ("corral.scripted", name) for name, d in models.items()
        }
        self.meter = UsageMeter()

    def get(self, name: str) -> ModelClient:
        try:
            client = self.clients[name]
        except KeyError:
            raise NotFound(f"unknown model {name!r}") from None
        system, model = self.described[name]
        return tracing.traced_model(client, system, model, name)  # itself unless a traced message is handled

    async def aclose(self) -> None:
        await self.http.aclose()
