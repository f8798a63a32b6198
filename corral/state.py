"""The state directory: generated keys, service credentials, the NATS configuration, definitions.

``corral init``/``corral up`` write it once and reuse it afterwards, so development tokens stay
valid across restarts. Secrets are written with mode 0600. Layout::

    secrets.json   service passwords, the auth-callout issuer seed, the development signing key
    nats.conf      server configuration (auth callout, AUTH, APP and SYS accounts, JetStream, and
                   the monitoring endpoint on loopback, on a port chosen once, for the monitor)
    definitions/   tools, graphs and tenants (the demo's, copied once; the services read it)
    corral.json    written by a running `corral up`: the NATS URL clients should use

The service users, their accounts and permissions come from the services' manifests
(``services/registry.py``); only the operator's own ``admin`` user is declared here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import nkeys

from contracts import subjects
from contracts.audit import STREAM as AUDIT_STREAM
from contracts.errors import NotFound
from contracts.permissions import Permissions
from corral.client import BROKER_AUTH_TIMEOUT_S
from corral.definitions_reference import SCHEMA_FILE, SCHEMA_LINE
from corral.demo import DEFINITIONS as DEMO_DEFINITIONS
from corral.nats_server import free_port
from corral.tenant_admin import admin_registry_api
from services.registry import SERVICES
from services.runtime.credentials import SECRETS_FILE, Secrets, load_secrets
from services.runtime.manifest import APP_ACCOUNT, AUTH_ACCOUNT, SYSTEM_ACCOUNT, User

DEFAULT_STATE_DIR = Path(".corral")
RUNTIME_FILE = "corral.json"  # for clients: the NATS URL (and the children), while a system runs
MAX_SUBSCRIPTIONS_PER_CONNECTION = 4096
ADMIN_USER = "admin"
# The operator's console: readiness checks and statistics of every service, bench's raw
# baseline, reading the audit trail.
ADMIN = User(
    ADMIN_USER,
    APP_ACCOUNT,
    Permissions(
        publish=(
            subjects.ALL_PINGS,
            subjects.ALL_STATS,
            "bench.>",
            f"$JS.API.STREAM.INFO.{AUDIT_STREAM}",
            f"$JS.API.STREAM.MSG.GET.{AUDIT_STREAM}",
            *admin_registry_api(),  # the operator keeps the tenant registry (corral tenant ...)
        ),
        subscribe=(f"{subjects.INBOX}._admin.>", "bench.>"),
        allow_responses=True,
    ),
)


def broker_users() -> tuple[User, ...]:
    """Every static broker user: each service's (from its manifest) and the admin."""
    return (*(user for manifest in SERVICES for user in manifest.users()), ADMIN)


def resolve_state_dir(explicit: str | Path | None = None) -> Path:
    """``--state-dir``, else ``CORRAL_STATE_DIR``, else ``.corral/`` in the current directory."""
    chosen = explicit or os.environ.get("CORRAL_STATE_DIR") or DEFAULT_STATE_DIR
    return Path(chosen).resolve()


class StateDirNotFound(NotFound):
    """No state directory (or none written yet) where :func:`resolve_state_dir` looks."""


def existing_state_dir(explicit: str | Path | None = None) -> Path:
    """The state directory a command reads (its secrets, the running system's URL), found as
    :func:`resolve_state_dir` finds it; one message says where it looked when there is none."""
    state_dir = resolve_state_dir(explicit)
    if not (state_dir / SECRETS_FILE).is_file():
        if explicit:
            how = "from --state-dir"
        elif os.environ.get("CORRAL_STATE_DIR"):
            how = "from $CORRAL_STATE_DIR"
        else:
            how = "in the current folder"
        raise StateDirNotFound(
            f"no Corral state directory at {state_dir} ({how}): `corral up` or `corral init` writes one;"
            " --state-dir or $CORRAL_STATE_DIR names another"
        )
    return state_dir


def generate_secrets() -> Secrets:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT).decode()
    return Secrets(
        passwords={user.name: secrets.token_urlsafe(24) for user in broker_users()},
        issuer_seed=seed,
        dev_key=secrets.token_urlsafe(32),
        monitor_operator_token=secrets.token_urlsafe(32),
    )


def issuer_public_key(found: Secrets) -> str:
    return nkeys.from_seed(found.issuer_seed.encode()).public_key.decode()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def init_state(
    state_dir: Path,
    *,
    host: str | None = "127.0.0.1",
    port: int = 4222,
    jetstream_dir: str | None = None,
    demo: bool = True,
) -> Secrets:
    """Create the state directory if needed (keeping existing secrets), write ``nats.conf``, and
    copy the demo definitions into ``definitions/`` if there are none yet (and ``demo``)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "jetstream").mkdir(exist_ok=True)
    path = state_dir / SECRETS_FILE
    if path.exists():
        found = load_secrets(state_dir)
        missing = {
            user: password for user, password in generate_secrets().passwords.items() if user not in found.passwords
        }
        token = found.monitor_operator_token or secrets.token_urlsafe(32)  # from before the monitor
        if missing or token != found.monitor_operator_token:
            # A state directory from before a service was added: keep its keys, add the user.
            found = Secrets({**found.passwords, **missing}, found.issuer_seed, found.dev_key, token)
            _write_private(path, json.dumps(found.to_json(), indent=2))
    else:
        found = generate_secrets()
        _write_private(path, json.dumps(found.to_json(), indent=2))
    config = render_nats_config(
        found,
        host=host,
        port=port,
        jetstream_dir=jetstream_dir or state_dir / "jetstream",
        monitoring_port=monitoring_port(state_dir / "nats.conf"),
    )
    _write_private(state_dir / "nats.conf", config)
    definitions = state_dir / "definitions"
    if demo and not definitions.exists():
        copy_demo_definitions(definitions)
    return found


def copy_demo_definitions(target: Path) -> None:
    """Copy the demo definitions to ``target``, each file's ``yaml-language-server`` line pointed
    at the installed JSON Schema (the shipped files name it relative to themselves), so that an
    editor checks the copies too."""
    shutil.copytree(DEMO_DEFINITIONS, target)
    for path in sorted(target.glob("*.yaml")):
        text = path.read_text()
        if text.startswith(SCHEMA_LINE):
            rest = text.partition("\n")[2]
            path.write_text(f"{SCHEMA_LINE}{SCHEMA_FILE}\n{rest}")


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


def monitoring_port(config: Path) -> int:
    """The broker's monitoring port: the one already in ``config`` (kept across ``corral up``s),
    else a free loopback port."""
    try:
        found = json.loads(config.read_text()).get("http", "")
        return int(str(found).rpartition(":")[2])
    except (OSError, ValueError, AttributeError):
        return free_port()


def render_nats_config(
    found: Secrets, *, host: str | None, port: int, jetstream_dir: Path | str, monitoring_port: int | None = None
) -> str:
    """The server configuration: auth callout, least-privilege service users, JetStream, and the
    monitoring endpoint (``/connz``, read by the monitor) on loopback only, when given a port.

    NATS accepts JSON inside its configuration format, so the structure is built as data and
    serialised rather than assembled from text fragments.
    """
    users = broker_users()

    def account(name: str) -> list[dict[str, Any]]:
        return [
            {
                "user": user.name,
                "password": found.passwords[user.name],
                "permissions": _permissions_block(user.permissions),
            }
            for user in users
            if user.account == name
        ]

    config: dict[str, Any] = {} if host is None else {"host": host}  # None: every interface
    config |= {
        # Kept across restarts (its id is new each time): the auth service then knows at once that
        # a restarted broker's old connections are gone (services/auth/connections.py).
        "server_name": "corral",
        "port": port,
        "max_payload": 1024 * 1024,
        # Per connection, for every connection: a tenant's own limits travel in its user JWT
        # (services/auth/callout.py), but nats-server 2.15 does not apply those to users an auth
        # callout issues in this (non-operator) configuration (nats-server issue 5002), so this
        # is the limit the broker enforces on tenants today. (Connections per tenant are counted
        # by the auth service, from the system account's events: services/auth/connections.py.)
        "max_subscriptions": MAX_SUBSCRIPTIONS_PER_CONNECTION,
        "jetstream": {"store_dir": str(jetstream_dir)},
        "accounts": {
            AUTH_ACCOUNT: {"users": account(AUTH_ACCOUNT)},
            APP_ACCOUNT: {"jetstream": "enabled", "users": account(APP_ACCOUNT)},
            # The broker's events and monitoring; its only user is the auth service's, which may
            # read APP's connect and disconnect events and list and close APP's connections.
            SYSTEM_ACCOUNT: {"users": account(SYSTEM_ACCOUNT)},
        },
        "system_account": SYSTEM_ACCOUNT,
        "authorization": {
            # How long a connecting client waits for the auth callout's answer, also when no auth
            # service answers (kept short: clients retry one the broker timed out, corral/client.py;
            # docs/operations.md, Sizing).
            "timeout": BROKER_AUTH_TIMEOUT_S,
            "auth_callout": {
                "issuer": issuer_public_key(found),
                "account": AUTH_ACCOUNT,
                # Static users skip the callout; every other connection (tenants) goes through it.
                "auth_users": [user.name for user in users],
            },
        },
    }
    if monitoring_port is not None:
        config["http"] = f"127.0.0.1:{monitoring_port}"  # never beyond this host: it lists every connection
    return json.dumps(config, indent=2) + "\n"


def cluster_node_config(
    config: str,
    *,
    name: str,
    port: int,
    cluster_port: int,
    routes: list[str],
    jetstream_dir: Path | str,
    monitoring_port: int | None = None,
    cluster: str = "corral",
) -> str:
    """One node of a NATS cluster, from the single broker's ``nats.conf`` (``config``): the same
    accounts, users, auth callout and system account, with the node's name, client port, route
    listener and the other nodes' routes, its own JetStream directory and monitoring port.
    Every node then asks the auth service (wherever it is connected) and applies the same
    permissions; streams and buckets get their copies from ``CORRAL_JETSTREAM_REPLICAS``."""
    node = json.loads(config)
    node |= {
        "server_name": name,
        "port": port,
        "cluster": {"name": cluster, "listen": f"{node.get('host', '0.0.0.0')}:{cluster_port}", "routes": routes},
        "jetstream": {"store_dir": str(jetstream_dir)},
    }
    node.pop("http", None)
    if monitoring_port is not None:
        node["http"] = f"127.0.0.1:{monitoring_port}"
    return json.dumps(node, indent=2) + "\n"


def make_cluster_node(state_dir: Path, *, name: str, port: int, cluster_port: int, routes: list[str]) -> None:
    """Rewrite the state directory's ``nats.conf`` (as :func:`init_state` wrote it) as node
    ``name`` of a cluster (``corral init --cluster-node``): its JetStream in the state directory,
    the monitoring port it had."""
    config = state_dir / "nats.conf"
    node = cluster_node_config(
        config.read_text(),
        name=name,
        port=port,
        cluster_port=cluster_port,
        routes=routes,
        jetstream_dir=state_dir / "jetstream",
        monitoring_port=monitoring_port(config),
    )
    _write_private(config, node)


def write_runtime_info(state_dir: Path, info: dict[str, Any]) -> None:
    (state_dir / RUNTIME_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_runtime_info(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / RUNTIME_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())
