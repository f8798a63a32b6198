"""A service's credentials, read from the state directory that ``corral init``/``corral up`` write.

``secrets.json`` holds the service users' passwords, the auth-callout issuer seed and the
development signing key (mode 0600). Writing it is operator tooling (``corral/state.py``); a
running service only reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECRETS_FILE = "secrets.json"


@dataclass(frozen=True)
class Secrets:
    passwords: dict[str, str]  # NATS user -> password (services, their audit writers, admin)
    issuer_seed: str  # account nkey seed (SA...) that signs auth-callout responses
    dev_key: str  # HS256 key for development tenant tokens
    # The operator's bearer token for the monitor's HTTP API (all tenants' figures, /metrics).
    monitor_operator_token: str = ""

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"passwords": self.passwords, "issuer_seed": self.issuer_seed, "dev_key": self.dev_key}
        if self.monitor_operator_token:
            found["monitor_operator_token"] = self.monitor_operator_token
        return found


def load_secrets(state_dir: Path) -> Secrets:
    data = json.loads((state_dir / SECRETS_FILE).read_text())
    return Secrets(
        passwords=data["passwords"],
        issuer_seed=data["issuer_seed"],
        dev_key=data["dev_key"],
        monitor_operator_token=data.get("monitor_operator_token", ""),
    )


def service_credentials(state_dir: Path, user: str) -> tuple[str, str]:
    """(user, password) of a service user from the state directory."""
    return user, load_secrets(state_dir).passwords[user]
