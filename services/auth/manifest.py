"""The auth service's declaration: the broker's authorization requests in, signed answers out."""

from contracts import subjects
from contracts.permissions import Permissions
from services.auth.settings import AuthSettings
from services.runtime.manifest import APP_ACCOUNT, AUTH_ACCOUNT, Manifest, Raw

# The broker's system-account subjects the auth service uses to count each tenant's connections
# (services/auth/broker_connections.py): APP's connect and disconnect events, APP's connection
# listing, and closing one connection by its id (on any server id: it is only known at run time).
CONNECT_EVENTS = f"$SYS.ACCOUNT.{APP_ACCOUNT}.CONNECT"
DISCONNECT_EVENTS = f"$SYS.ACCOUNT.{APP_ACCOUNT}.DISCONNECT"
LIST_CONNECTIONS = f"$SYS.REQ.ACCOUNT.{APP_ACCOUNT}.CONNZ"
CLOSE_CONNECTION = "$SYS.REQ.SERVER.{server}.KICK"

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
    # Its audit writer's connection also announces a service replica gone without a word (its
    # connection closed with no leaving notice: a kill -9), on that service's leaving subject.
    announces_departures=True,
    # A third connection, in the system account (the user `auth-system`), follows the tenants'
    # connections in APP, so each tenant's connection limit holds across disconnects and restarts.
    # Nothing else of the system account: no other account's events, no server-wide requests.
    system=Permissions(
        publish=(LIST_CONNECTIONS, CLOSE_CONNECTION.format(server="*")),
        subscribe=(CONNECT_EVENTS, DISCONNECT_EVENTS, f"{subjects.service_inbox_prefix('auth-system')}.>"),
    ),
)
