"""A service's one declaration: what it consumes, publishes and requests, whom it watches, its settings.

Each service folder has a ``manifest.py`` holding one :class:`Manifest`, and ``services/registry.py``
lists them. Everything about a service that is not its code is derived from the manifest and
nothing else: the broker permissions of its user (:meth:`Manifest.users`), the subscriptions the
runtime makes (:class:`~services.runtime.service.Service`), the processes ``corral up`` starts and
the names ``--scale`` takes, the credentials in the state directory, the AsyncAPI document and
the compose file's check. A manifest imports only ``contracts`` and this module, so reading one is
cheap and never starts a service's machinery.

Three ways of consuming:

- :class:`Consume`: a core NATS subscription in the service's queue group; every message is an
  envelope, guarded and validated before the handler sees it, and answered on its reply subject.
- :class:`Durable`: a JetStream durable pull consumer shared by the replicas (work that must
  survive a crash); envelopes as above, acknowledged once handled, redelivered after ``ack_wait_s``
  if a replica dies holding one.
- :class:`Raw`: a subscription whose messages are not envelopes (the auth callout); the handler
  takes the message itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

from pydantic import BaseModel

from contracts import subjects
from contracts.audit import STREAM as AUDIT_STREAM
from contracts.envelope import Kind, Result
from contracts.permissions import Permissions
from contracts.registry import STREAM as REGISTRY_STREAM
from services.runtime.settings import Settings

# Accounts of the broker: tenants and services share APP (per-user permissions keep them apart);
# AUTH holds the auth-callout responder, which the callout requires to be in an account of its own;
# SYS is the broker's system account (its events and monitoring requests).
APP_ACCOUNT = "APP"
AUTH_ACCOUNT = "AUTH"
SYSTEM_ACCOUNT = "SYS"

# What a service needs of JetStream to keep its audit chains: create, update or look up the
# stream, and read the last entry of its own chains only (a direct get names the subject, so the
# permission can: t.*.audit.<service>). Appends are plain publishes to its own audit subject.
AUDIT_STREAM_API = (
    f"$JS.API.STREAM.CREATE.{AUDIT_STREAM}",
    f"$JS.API.STREAM.UPDATE.{AUDIT_STREAM}",
    f"$JS.API.STREAM.INFO.{AUDIT_STREAM}",
)


def audit_api(service: str) -> tuple[str, ...]:
    """A service's audit permissions: its own subjects, the stream, its own chains' heads."""
    return (
        subjects.service_audit(service),
        *AUDIT_STREAM_API,
        f"$JS.API.DIRECT.GET.{AUDIT_STREAM}.{subjects.service_audit(service)}",
    )


@dataclass(frozen=True)
class Consume:
    """A core subscription in the service's queue group, carrying ``Envelope[payload]`` of ``kind``."""

    name: str
    subject: str
    kind: Kind
    payload: type[BaseModel]
    summary: str
    # Tenant-facing operations accept only the tenant's own inbox as a reply subject.
    tenant_facing: bool = False
    reply: type[BaseModel] = Result


@dataclass(frozen=True)
class Durable:
    """A JetStream durable pull consumer on ``stream`` filtered to ``subject``, shared by the replicas."""

    name: str
    stream: str
    subject: str
    kind: Kind
    payload: type[BaseModel]
    summary: str
    # How long a delivered message may stay unacknowledged before it goes to another replica.
    ack_wait_s: float = 30.0
    # Deliveries before the broker gives a message up: a message no replica can ever finish (it
    # kills its handler, or the connection cannot read it) must not come back for ever. -1: no limit.
    max_deliver: int = 20
    reply: type[BaseModel] = Result


@dataclass(frozen=True)
class Raw:
    """A subscription of messages that are not envelopes; the handler takes the ``Msg``."""

    name: str
    subject: str
    summary: str


Operation: TypeAlias = Consume | Durable | Raw


@dataclass(frozen=True)
class Publishes:
    """Subjects the service publishes to without waiting for an answer (events, forwarded requests)."""

    subject: str
    summary: str
    # The envelope's payload, for the AsyncAPI document (with ``envelope=False``, the whole body).
    payload: Any = None
    # The AsyncAPI address, where the wildcards' names are not obvious (``events.>`` is one run's id).
    address: str | None = None
    envelope: bool = True  # False: the body is not an envelope (a run's history, for one)


@dataclass(frozen=True)
class User:
    """A broker user a manifest needs: its name, account and permissions."""

    name: str
    account: str
    permissions: Permissions


@dataclass(frozen=True)
class Manifest:
    """Everything the rest of Corral needs to know about one service."""

    name: str
    summary: str
    consumes: tuple[Operation, ...]
    publishes: tuple[Publishes, ...] = ()
    requests: tuple[str, ...] = ()  # subjects it requests (the replies come to its own inbox)
    watches: tuple[str, ...] = ()  # services whose liveness it probes (services/runtime/liveness.py)
    # Counts its own running replicas (``Service.replicas``), to share a limit between them.
    counts_replicas: bool = False
    # JetStream API subjects it uses beyond its durable consumers' (:func:`stream_api`, :func:`kv_api`).
    jetstream: tuple[str, ...] = ()
    settings: type[Settings] = Settings
    account: str = APP_ACCOUNT
    # Writes audit records. A service outside APP writes them through a second connection in APP,
    # as the user ``<name>-audit`` (the auth service's refusals of signed tokens), which also
    # answers its statistics requests.
    audit: bool = True
    # What the service needs of the broker's system account, as the user ``<name>-system`` (the
    # auth service's view of the tenants' connections); ``None``: no such user.
    system: Permissions | None = None
    # Follows the tenant registry (services/runtime/tenant_registry.py): read-only access to it,
    # for a service outside APP through its audit writer's connection.
    follows_registry: bool = True
    # Announces, through its audit writer's connection, the departure of any service's replica
    # whose connection the broker saw close (the auth service, from the broker's DISCONNECT
    # events): a replica killed with SIGKILL sends no leaving notice of its own.
    announces_departures: bool = False
    module: str = field(default="")  # run as ``python -m <module>``; default ``services.<name>``

    def __post_init__(self) -> None:
        subjects.validate_name(self.name)
        if not self.module:
            object.__setattr__(self, "module", f"services.{self.name}")
        if self.announces_departures and self.audit_user is None:
            raise ValueError(f"service {self.name!r} announces departures through an audit writer it does not have")
        names = [op.name for op in self.consumes]
        if len(set(names)) != len(names):
            raise ValueError(f"service {self.name!r} declares an operation name twice: {names}")

    @property
    def in_app(self) -> bool:
        """Whether the service lives in the tenants' account (then it answers pings and stats)."""
        return self.account == APP_ACCOUNT

    @property
    def audit_user(self) -> str | None:
        """The second user through which a service outside APP writes its audit records."""
        return f"{self.name}-audit" if self.audit and not self.in_app else None

    @property
    def system_user(self) -> str | None:
        """The service's user in the broker's system account, if it declares one."""
        return f"{self.name}-system" if self.system is not None else None

    def durable_name(self, op: Durable) -> str:
        return f"{self.name}-{op.name}"

    def operation(self, name: str) -> Operation:
        for op in self.consumes:
            if op.name == name:
                return op
        raise KeyError(f"service {self.name!r} declares no operation {name!r}")

    def permissions(self) -> Permissions:
        """The least privilege the service's own user needs, derived from what it declares."""
        subscribe = [op.subject for op in self.consumes if not isinstance(op, Durable)]
        if not self.in_app:
            return Permissions(subscribe=tuple(subscribe), allow_responses=True)
        publish = [p.subject for p in self.publishes]
        publish += self.requests
        publish += [subjects.ping(other) for other in self.watches]
        if self.counts_replicas:
            publish.append(subjects.ping(self.name))
        publish.append(subjects.leaving(self.name))
        for op in self.consumes:
            if isinstance(op, Durable):
                publish += _durable_api(op.stream, self.durable_name(op))
        publish += self.jetstream
        if self.follows_registry:
            publish += registry_read_api()
        if self.audit:
            publish += audit_api(self.name)
        subscribe += [
            f"{subjects.service_inbox_prefix(self.name)}.>",
            subjects.ping(self.name),
            subjects.stats(self.name),
            *(subjects.leaving(other) for other in self.watches),
        ]
        return Permissions(publish=_unique(publish), subscribe=_unique(subscribe), allow_responses=True)

    def users(self) -> tuple[User, ...]:
        """The broker users of this service: its own, its audit writer's and its system-account
        user's, for those it has."""
        users = [User(self.name, self.account, self.permissions())]
        if self.audit_user is not None:
            # It also answers the service's pings and statistics requests, which come from APP.
            writer = Permissions(
                publish=(
                    *audit_api(self.name),
                    *(registry_read_api() if self.follows_registry else ()),
                    *((subjects.ALL_LEAVING,) if self.announces_departures else ()),
                ),
                subscribe=(
                    f"{subjects.service_inbox_prefix(self.audit_user)}.>",
                    subjects.ping(self.name),
                    subjects.stats(self.name),
                ),
                allow_responses=True,
            )
            users.append(User(self.audit_user, APP_ACCOUNT, writer))
        if self.system_user is not None and self.system is not None:
            users.append(User(self.system_user, SYSTEM_ACCOUNT, self.system))
        return tuple(users)


def stream_api(stream: str) -> tuple[str, ...]:
    """What a service that owns a stream uses of it: create or update it, read it (direct gets),
    purge a subject of it, and run consumers on it."""
    return (
        f"$JS.API.STREAM.CREATE.{stream}",
        f"$JS.API.STREAM.UPDATE.{stream}",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.PURGE.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
    )


def kv_api(bucket: str) -> tuple[str, ...]:
    """What a service that owns a key-value bucket uses of it: the bucket's stream, and its keys."""
    return (*stream_api(f"KV_{bucket}"), f"$KV.{bucket}.>")


def registry_read_api() -> tuple[str, ...]:
    """The JetStream API subjects a service needs to follow the tenant registry: read only (no
    ``$KV.TENANTS.>`` publish, no stream create, update, purge or delete), so a compromised
    service cannot change a tenant's policy."""
    stream = REGISTRY_STREAM
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.DELETE.{stream}.*",
    )


def _durable_api(stream: str, durable: str) -> list[str]:
    """The JetStream API subjects a replica of a durable consumer uses: create or look up the
    consumer, pull the next messages, acknowledge them."""
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
        f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
