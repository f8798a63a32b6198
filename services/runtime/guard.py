"""The tenant guard: the envelope's tenant must be the subject's, and replies stay in-tenant.

Every check takes the tenant from the subject the message arrived on; the envelope and payload
are only ever compared with it, never trusted in its place.
"""

from __future__ import annotations

from contracts import subjects
from contracts.errors import Forbidden, TenantMismatch

SERVICE_INBOXES = f"{subjects.INBOX}._"


def reply_allowed(reply: str, tenant: str, *, allow_service_inbox: bool) -> bool:
    """Whether ``reply`` may be answered for ``tenant`` (see :func:`check_reply`)."""
    return subjects.reply_belongs_to(reply, tenant) or (allow_service_inbox and reply.startswith(SERVICE_INBOXES))


def check_reply(reply: str, tenant: str, *, allow_service_inbox: bool) -> None:
    """A reply subject must be the tenant's own inbox (or, between services, a service inbox).

    The server does not check reply subjects against permissions: without this a tenant could
    have a service publish into another tenant's inbox.
    """
    if reply and not reply_allowed(reply, tenant, allow_service_inbox=allow_service_inbox):
        raise Forbidden(f"reply subject is outside tenant {tenant!r}'s inbox")


def check_tenant(envelope_tenant: str, subject_tenant: str) -> None:
    if envelope_tenant != subject_tenant:
        raise TenantMismatch("envelope tenant does not match the subject's tenant")
