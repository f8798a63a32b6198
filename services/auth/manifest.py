"""The auth service's declaration: the broker's authorization requests in, signed answers out."""

from contracts import subjects
from services.auth.settings import AuthSettings
from services.runtime.manifest import AUTH_ACCOUNT, Manifest, Raw

MANIFEST = Manifest(
    name="auth",
    summary="The NATS auth-callout responder: turns a tenant's JWT into permissions scoped to its subjects",
    consumes=(
        Raw(
            "callout",
            subjects.AUTH_CALLOUT,
            "NATS auth callout: the server's authorization request JWT; answered with a signed authorization "
            "response carrying a tenant-scoped user JWT",
        ),
    ),
    settings=AuthSettings,
    # The callout responder must live in an account of its own; its refusals of signed tokens
    # reach tenants' audit trails through a second connection in APP (the user `auth-audit`).
    account=AUTH_ACCOUNT,
)
