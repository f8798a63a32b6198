"""Token usage per tenant and model, as reported by the model servers (or approximated)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from services.llm.types import Usage


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
