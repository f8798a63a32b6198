"""Token usage per tenant and model, as reported by the model servers (or approximated)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from services.llm.types import Usage

# The statistics figure the services that call models report (``corral.stats.<service>``).
MODEL_TOKENS = "model_tokens"
MODEL_TOKENS_HELP = "Model tokens used (prompt and completion), per model"


@dataclass
class UsageMeter:
    """Tokens used per tenant and model (per process; reported in run events and logs)."""

    totals: dict[tuple[str, str], Usage] = field(default_factory=lambda: defaultdict(Usage))
    # Also told each call's tokens (tenant, tokens, model): the service's ``model_tokens`` statistics.
    counts: Callable[[str, int, str], None] | None = None

    def record(self, tenant: str, model: str, usage: Usage) -> None:
        if self.counts is not None and usage.total_tokens:
            self.counts(tenant, usage.total_tokens, model)
        current = self.totals[(tenant, model)]
        self.totals[(tenant, model)] = Usage(
            current.prompt_tokens + usage.prompt_tokens, current.completion_tokens + usage.completion_tokens
        )

    def for_tenant(self, tenant: str) -> dict[str, int]:
        return {model: usage.total_tokens for (owner, model), usage in self.totals.items() if owner == tenant}
