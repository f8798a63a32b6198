"""The tenant guard: the envelope's tenant must be the subject's, and replies stay in-tenant.

Every check takes the tenant from the subject the message arrived on; the envelope and payload
are only ever compared with it, never trusted in its place.
"""

from __future__ import annotations

from contracts import subjects
from contracts.errors import Forbidden, TenantMismatch

SERVICE_INBOXES = f"{subjects.INBOX}._"


class ReplyOutsideInbox(Forbidden):
    """A reply subject that is not the tenant's own inbox (nor, scoped, the principal's): the
    request cannot be answered on it (services/runtime/service.py says where it is told instead)."""


def reply_allowed(reply: str, tenant: str, *, allow_service_inbox: bool, principal: str | None = None) -> bool:
    """Whether ``reply`` may be answered for ``tenant`` (see :func:`check_reply`)."""
    if principal is not None:
        return subjects.reply_belongs_to(reply, tenant, principal)
    return subjects.reply_belongs_to(reply, tenant) or (allow_service_inbox and reply.startswith(SERVICE_INBOXES))


def check_reply(reply: str, tenant: str, *, allow_service_inbox: bool, principal: str | None = None) -> None:
    """A reply subject must be the tenant's own inbox (or, between services, a service inbox;
    with ``principal``, that principal's own inbox within the tenant's).

    The server does not check reply subjects against permissions: without this a tenant could
    have a service publish into another tenant's inbox (or one user into another's).
    """
    if reply and not reply_allowed(reply, tenant, allow_service_inbox=allow_service_inbox, principal=principal):
        where = f"principal {principal!r}'s" if principal is not None else f"tenant {tenant!r}'s"
        prefix = subjects.inbox_prefix(tenant, principal)
        raise ReplyOutsideInbox(f"reply subject is outside {where} inbox: connect with inbox_prefix {prefix!r}")


def check_tenant(envelope_tenant: str, subject_tenant: str) -> None:
    if envelope_tenant != subject_tenant:
        raise TenantMismatch("envelope tenant does not match the subject's tenant")
