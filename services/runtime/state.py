"""The state directory: generated keys, service credentials and the NATS configuration.

``corral init``/``corral up`` write it once and reuse it afterwards, so development tokens stay
valid across restarts. Secrets are written with mode 0600. Layout::

    secrets.json   service passwords, the auth-callout issuer seed, the development signing key
    nats.conf      server configuration (auth callout, AUTH and APP accounts, JetStream)
    corral.json    written by a running `corral up`: the NATS URL clients should use
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from contracts import subjects
from contracts.permissions import SERVICE_PERMISSIONS, Permissions

SERVICES = ("auth", "router", "graph", "tools")
AUTH_USER = "auth"
APP_ACCOUNT = "APP"
AUTH_ACCOUNT = "AUTH"
DEFAULT_STATE_DIR = Path(".corral")


def resolve_state_dir(explicit: str | Path | None = None) -> Path:
    """``--state-dir``, else ``CORRAL_STATE_DIR``, else ``.corral/`` in the current directory."""
    chosen = explicit or os.environ.get("CORRAL_STATE_DIR") or DEFAULT_STATE_DIR
    return Path(chosen).resolve()


@dataclass(frozen=True)
class Secrets:
    passwords: dict[str, str]  # NATS user -> password (services, auth, admin)
    issuer_seed: str  # account nkey seed (SA...) that signs auth-callout responses
    dev_key: str  # HS256 key for development tenant tokens

    @property
    def issuer_public_key(self) -> str:
        return nkeys.from_seed(self.issuer_seed.encode()).public_key.decode()

    @classmethod
    def generate(cls) -> Secrets:
        users = (*SERVICES, *[name for name in SERVICE_PERMISSIONS if name not in SERVICES])
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT).decode()
        return cls(
            passwords={user: secrets.token_urlsafe(24) for user in users},
            issuer_seed=seed,
            dev_key=secrets.token_urlsafe(32),
        )

    def to_json(self) -> dict[str, Any]:
        return {"passwords": self.passwords, "issuer_seed": self.issuer_seed, "dev_key": self.dev_key}


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def load_secrets(state_dir: Path) -> Secrets:
    data = json.loads((state_dir / "secrets.json").read_text())
    return Secrets(passwords=data["passwords"], issuer_seed=data["issuer_seed"], dev_key=data["dev_key"])


def init_state(
    state_dir: Path, *, host: str | None = "127.0.0.1", port: int = 4222, jetstream_dir: str | None = None
) -> Secrets:
    """Create the state directory if needed (keeping existing secrets) and write ``nats.conf``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "jetstream").mkdir(exist_ok=True)
    if (state_dir / "secrets.json").exists():
        found = load_secrets(state_dir)
        missing = {
            user: password for user, password in Secrets.generate().passwords.items() if user not in found.passwords
        }
        if missing:  # a state directory from before a user was added: keep its keys, add the user
            found = Secrets({**found.passwords, **missing}, found.issuer_seed, found.dev_key)
            _write_private(state_dir / "secrets.json", json.dumps(found.to_json(), indent=2))
    else:
        found = Secrets.generate()
        _write_private(state_dir / "secrets.json", json.dumps(found.to_json(), indent=2))
    config = render_nats_config(found, host=host, port=port, jetstream_dir=jetstream_dir or state_dir / "jetstream")
    _write_private(state_dir / "nats.conf", config)
    return found


def _permissions_block(permissions: Permissions) -> dict[str, Any]:
    block: dict[str, Any] = {
        "publish": {"allow": list(permissions.publish)},
        "subscribe": {"allow": list(permissions.subscribe)},
    }
    if permissions.deny_publish:
        block["publish"]["deny"] = list(permissions.deny_publish)
    if permissions.deny_subscribe:
        block["subscribe"]["deny"] = list(permissions.deny_subscribe)
    if permissions.allow_responses:
        block["allow_responses"] = True
    return block


def render_nats_config(found: Secrets, *, host: str | None, port: int, jetstream_dir: Path | str) -> str:
    """The server configuration: auth callout, least-privilege service users, JetStream.

    NATS accepts JSON inside its configuration format, so the structure is built as data and
    serialised rather than assembled from text fragments.
    """
    app_users = [
        {"user": name, "password": found.passwords[name], "permissions": _permissions_block(perms)}
        for name, perms in SERVICE_PERMISSIONS.items()
    ]
    auth_user = {
        "user": AUTH_USER,
        "password": found.passwords[AUTH_USER],
        "permissions": {
            "subscribe": {"allow": [subjects.AUTH_CALLOUT]},
            "publish": {"allow": []},
            "allow_responses": True,
        },
    }
    config: dict[str, Any] = {} if host is None else {"host": host}  # None: every interface
    config |= {
        "port": port,
        "max_payload": 1024 * 1024,
        "jetstream": {"store_dir": str(jetstream_dir)},
        "accounts": {
            AUTH_ACCOUNT: {"users": [auth_user]},
            APP_ACCOUNT: {"jetstream": "enabled", "users": app_users},
        },
        "authorization": {
            "timeout": 2,
            "auth_callout": {
                "issuer": found.issuer_public_key,
                "account": AUTH_ACCOUNT,
                # Static users skip the callout; every other connection (tenants) goes through it.
                "auth_users": [AUTH_USER, *SERVICE_PERMISSIONS],
            },
        },
    }
    return json.dumps(config, indent=2) + "\n"


def write_runtime_info(state_dir: Path, info: dict[str, Any]) -> None:
    (state_dir / "corral.json").write_text(json.dumps(info, indent=2) + "\n")


def read_runtime_info(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / "corral.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def service_credentials(state_dir: Path, user: str) -> tuple[str, str]:
    """(user, password) of a service user from the state directory."""
    return user, load_secrets(state_dir).passwords[user]
