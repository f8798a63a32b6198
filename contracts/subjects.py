"""The one module that builds and parses subjects.

Every subject carrying tenant traffic is ``t.<tenant>.<...>``; the tenant token is the partition
key for permissions, guards, stream filters and monitoring. Builders validate every identifier
they place into a subject, so no caller can produce a wildcard or an extra token by accident.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from dataclasses import dataclass

from contracts.errors import InvalidRequest
from contracts.tenants import validate_name, validate_run_id, validate_tenant_id

PREFIX = "t"
INBOX = "_INBOX"

# Subscription patterns for the services (queue groups named after the service). The subjects a
# tenant publishes to end with its principal's token (:func:`principal_token`): the broker lets a
# connection publish only with its own, so a service reads the principal from the subject.
# t.<tenant>.router.request.<principal>, or .<principal>.<scopes> to send with the token's scopes.
ROUTER_REQUESTS = "t.*.router.request.>"
GRAPH_RUNS = "t.*.graph.run"
WORKFLOW_STARTS = "t.*.workflow.start"
# t.<tenant>.workflow.signal.<principal>, or .<principal>.<scope> to send as a holder of a scope.
WORKFLOW_SIGNALS = "t.*.workflow.signal.>"
WORKFLOW_QUERIES = "t.*.workflow.query.*"
# The workflow engine's own durable subjects (JetStream; no tenant may publish or read them).
WORKFLOW_HISTORY = "t.*.workflow.history.*"
WORKFLOW_TASKS = "t.*.workflow.task.*"
WORKFLOW_TIMERS = "t.*.workflow.timer.*"
SWARM_TURNS = "t.*.swarm.turn"
# t.<tenant>.monitor.query.<principal>[.<scopes>]: a tenant's own figures (the subject's tenant,
# no other); with the token's scopes, which a principal-scoped tenant's figures need.
MONITOR_QUERIES = "t.*.monitor.query.>"
TOOL_CALLS = "t.*.tool.*.call"
ALL_EVENTS = "t.*.events.>"
ALL_AUDIT = "t.*.audit.>"
AUTH_CALLOUT = "$SYS.REQ.USER.AUTH"


MAX_PRINCIPAL_BYTES = 128
# Entries of the caches keyed by tenant (a subject per tenant and operation): past 10,000 active
# tenants, 4,096 entries missed on nearly every message (1.7 us a parse instead of 0.06 us).
PER_TENANT_CACHE = 16_384
_PRINCIPAL_TOKEN = re.compile(r"[a-z2-7]{2,205}")


@functools.lru_cache(maxsize=4096)
def principal_token(principal: str) -> str:
    """The subject token of a principal (a verified token's ``sub``): lowercase base32 of its UTF-8
    bytes, so any ``sub`` (an e-mail, ``auth0|123``) fits in one token and none can add a token, a
    wildcard or a space."""
    raw = principal.encode()
    if not raw or len(raw) > MAX_PRINCIPAL_BYTES:
        raise InvalidRequest(f"a principal is 1 to {MAX_PRINCIPAL_BYTES} bytes")
    return base64.b32encode(raw).decode().rstrip("=").lower()


@functools.lru_cache(maxsize=4096)  # only tokens that decode are cached (an exception is not)
def principal_of(token: str) -> str:
    """The principal a subject token names (the inverse of :func:`principal_token`)."""
    if not _PRINCIPAL_TOKEN.fullmatch(token):
        raise InvalidRequest("the subject does not name a principal")
    try:
        principal = base64.b32decode(token.upper() + "=" * (-len(token) % 8)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("the subject does not name a principal") from None
    if principal_token(principal) != token:  # one spelling per principal
        raise InvalidRequest("the subject does not name a principal")
    return principal


def router_request(tenant: str, principal: str, scopes: frozenset[str] = frozenset()) -> str:
    """Where ``principal`` of ``tenant`` sends requests; with the ``scopes`` of its verified token
    (:func:`scopes_token`), where the router's ``when`` rules see them (the broker lets a
    connection publish there only with exactly its token's scopes)."""
    subject = f"t.{validate_tenant_id(tenant)}.router.request.{principal_token(principal)}"
    token = scopes_token(scopes)
    return f"{subject}.{token}" if token else subject


# The scopes of one token, joined, that a request subject may carry; a token with more presents none.
MAX_SCOPES_BYTES = 512


def scopes_token(scopes: frozenset[str]) -> str | None:
    """The subject token of a set of scopes: base32 of the sorted scopes joined by spaces (None:
    no scopes, or more than :data:`MAX_SCOPES_BYTES` of them)."""
    raw = " ".join(sorted(scopes)).encode()
    if not raw or len(raw) > MAX_SCOPES_BYTES:
        return None
    return base64.b32encode(raw).decode().rstrip("=").lower()


def scopes_of(token: str) -> frozenset[str]:
    """The scopes a request subject's last token carries (:func:`scopes_token`)."""
    try:
        raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
        return frozenset(raw.decode().split())
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request subject's scopes token is not one") from None


def graph_run(tenant: str) -> str:
    return f"t.{validate_tenant_id(tenant)}.graph.run"


def workflow_start(tenant: str) -> str:
    return f"t.{validate_tenant_id(tenant)}.workflow.start"


def workflow_signal(tenant: str, principal: str, scope: str | None = None) -> str:
    """Where ``principal`` sends signals to its tenant's runs; with ``scope``, as a holder of that
    scope (the broker lets a connection publish there only if its verified token holds it)."""
    base = f"t.{validate_tenant_id(tenant)}.workflow.signal.{principal_token(principal)}"
    return base if scope is None else f"{base}.{scope_token(scope)}"


def workflow_query(tenant: str, principal: str) -> str:
    """Where ``principal`` asks about its tenant's runs (list, show)."""
    return f"t.{validate_tenant_id(tenant)}.workflow.query.{principal_token(principal)}"


def monitor_query(tenant: str, principal: str, scopes: frozenset[str] = frozenset()) -> str:
    """Where ``principal`` asks the monitor for its tenant's figures (only that tenant's); with the
    ``scopes`` of its verified token (:func:`scopes_token`, as :func:`router_request`), which the
    broker lets a connection publish on only with exactly its token's scopes."""
    subject = f"t.{validate_tenant_id(tenant)}.monitor.query.{principal_token(principal)}"
    token = scopes_token(scopes)
    return f"{subject}.{token}" if token else subject


def workflow_history(tenant: str, run_id: str) -> str:
    """One run's history: each event one message, in order."""
    return f"t.{validate_tenant_id(tenant)}.workflow.history.{validate_run_id(run_id)}"


def workflow_task(tenant: str, run_id: str) -> str:
    """A wake-up of one run: taken by one workflow replica, which drives the run on."""
    return f"t.{validate_tenant_id(tenant)}.workflow.task.{validate_run_id(run_id)}"


def workflow_timer(tenant: str, run_id: str) -> str:
    """One run's timer (a scheduled message, one per run: the next time it must wake)."""
    return f"t.{validate_tenant_id(tenant)}.workflow.timer.{validate_run_id(run_id)}"


def scope_token(scope: str) -> str:
    """The subject token of a scope (or role) of a verified token: the same encoding as a principal's."""
    return principal_token(scope)


def scope_of(token: str) -> str:
    return principal_of(token)


def swarm_turn(tenant: str) -> str:
    return f"t.{validate_tenant_id(tenant)}.swarm.turn"


@functools.lru_cache(maxsize=PER_TENANT_CACHE)  # per tenant and tool, on every tool call; only valid parts are cached
def tool_call(tenant: str, tool: str) -> str:
    return f"t.{validate_tenant_id(tenant)}.tool.{validate_name(tool)}.call"


# The principal token of events of a run no principal asked for (a service's own).
NO_PRINCIPAL = "_"


def events(tenant: str, principal: str | None, run_id: str) -> str:
    """A run's progress events, under the principal who asked for it (``t.<tenant>.events.<p>.<run>``)."""
    who = NO_PRINCIPAL if principal is None else principal_token(principal)
    return f"t.{validate_tenant_id(tenant)}.events.{who}.{validate_run_id(run_id)}"


def tenant_events(tenant: str) -> str:
    """Every run's events of one tenant (what a tenant user may subscribe to, unless scoped)."""
    return f"t.{validate_tenant_id(tenant)}.events.>"


def principal_events(tenant: str, principal: str) -> str:
    """The events of one principal's runs (a principal-scoped tenant user's only ones)."""
    return f"t.{validate_tenant_id(tenant)}.events.{principal_token(principal)}.>"


def audit(tenant: str, service: str) -> str:
    return f"t.{validate_tenant_id(tenant)}.audit.{validate_name(service)}"


def tenant_audit(tenant: str) -> str:
    """Every audit subject of one tenant (the filter of its hash chain)."""
    return f"t.{validate_tenant_id(tenant)}.audit.>"


def service_audit(service: str) -> str:
    """The audit subjects one service may write, across tenants."""
    return f"t.*.audit.{validate_name(service)}"


def inbox_prefix(tenant: str, principal: str | None = None) -> str:
    """The inbox prefix a tenant connection uses (nats-py ``inbox_prefix``): the tenant's, or
    within it the principal's own (``_INBOX.<tenant>.<p>``), which a principal-scoped tenant's
    users must use and any may."""
    prefix = f"{INBOX}.{validate_tenant_id(tenant)}"
    return prefix if principal is None else f"{prefix}.{principal_token(principal)}"


def tenant_inboxes(tenant: str, principal: str | None = None) -> str:
    return f"{inbox_prefix(tenant, principal)}.>"


def service_inbox_prefix(service: str) -> str:
    """Inbox prefix of a service connection.

    The leading underscore can never start a tenant id, so a service inbox can never be
    mistaken for (or granted to) a tenant.
    """
    return f"{INBOX}._{validate_name(service)}"


def ping(service: str) -> str:
    """Health probe subject answered by every replica of a service."""
    return f"corral.ping.{validate_name(service)}"


ALL_PINGS = "corral.ping.>"


def leaving(service: str) -> str:
    """A replica that begins to stop says so here, before it stops taking messages: the services
    that pass requests on to it (the router to its executors) look again at once whether any
    replica is left (services/runtime/liveness.py), not at their next probe."""
    return f"corral.leaving.{validate_name(service)}"


# Every service's leaving subject: the auth service announces there the replicas whose
# connection the broker saw close without a notice (a kill -9; services/auth/broker_connections.py).
ALL_LEAVING = "corral.leaving.*"


def stats(service: str) -> str:
    """Statistics subject answered by every replica of a service (services/runtime/stats.py)."""
    return f"corral.stats.{validate_name(service)}"


ALL_STATS = "corral.stats.>"


@dataclass(frozen=True, slots=True)
class TenantSubject:
    """A parsed tenant subject: ``t.<tenant>.<area>.<rest...>``."""

    tenant: str
    area: str
    rest: tuple[str, ...]

    @property
    def tool(self) -> str:
        """The tool name of a ``t.<tenant>.tool.<tool>.call`` subject."""
        if self.area != "tool" or len(self.rest) != 2 or self.rest[1] != "call":
            raise InvalidRequest("not a tool call subject")
        return self.rest[0]


def tenant_token(subject: str) -> str:
    """The second token of a ``t.<tenant>.…`` subject, not validated ('' for any other subject).

    A key to count and admit messages by before anything is decoded (services/runtime/fairness.py);
    never an identity: :func:`parse` validates it before anything acts on it."""
    if not subject.startswith("t."):
        return ""
    end = subject.find(".", 2)
    return subject[2:end] if end > 2 else ""


def parse(subject: str) -> TenantSubject:
    """Parse a tenant subject; the tenant is validated, never trusted from anywhere else."""
    return _parse(subject)


# Services see the same few subjects over and over (one per tenant and operation). Only subjects
# that parse are cached (an exception is never cached), and the result is immutable.
@functools.lru_cache(maxsize=PER_TENANT_CACHE)
def _parse(subject: str) -> TenantSubject:
    parts = subject.split(".")
    if len(parts) < 3 or parts[0] != PREFIX:
        raise InvalidRequest(f"not a tenant subject: {subject[:120]!r}")
    tenant = validate_tenant_id(parts[1])
    if any(not p or p in ("*", ">") for p in parts[2:]):
        raise InvalidRequest(f"malformed subject: {subject[:120]!r}")
    return TenantSubject(tenant=tenant, area=parts[2], rest=tuple(parts[3:]))


def reply_belongs_to(reply: str, tenant: str, principal: str | None = None) -> bool:
    """True if ``reply`` is inside ``tenant``'s inbox namespace (``principal``: inside that
    principal's own).

    The server does not check reply subjects against permissions, so every service must.
    """
    prefix = f"{INBOX}.{tenant}." if principal is None else f"{INBOX}.{tenant}.{principal_token(principal)}."
    return reply.startswith(prefix) and len(reply) > len(prefix)
