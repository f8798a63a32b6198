"""The corral command: run the system, mint development tokens, send requests, benchmark.

Every error ends in one line on standard error (``error: <code>: <message>``; with ``--json``,
``{"ok": false, "error": {"code", "message"}}`` on standard output) and a non-zero exit status,
never in a traceback (``CORRAL_DEBUG=1`` shows it)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from contracts import subjects
from contracts.envelope import RunEvent
from contracts.errors import (
    CorralError,
    Forbidden,
    Internal,
    InvalidRequest,
    NotFound,
    TenantMismatch,
    Unauthorized,
    Unavailable,
)
from corral.state import (
    ADMIN_USER,
    RUNTIME_FILE,
    existing_state_dir,
    init_state,
    make_cluster_node,
    read_runtime_info,
    resolve_state_dir,
    write_runtime_info,
)
from services.registry import NAMES as SERVICE_NAMES
from services.runtime import loop as event_loop
from services.runtime.credentials import load_secrets

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process that SIGPIPE ended (128 + 13)
DESCRIPTION = "Corral: a multi-tenant runtime for AI agents. Run the system, send requests, inspect it."
NATS_URL_HELP = "the broker (default: $CORRAL_NATS_URL, else the running system's, from corral.json)"
TIMEOUT_HELP = "seconds before giving up, connecting included (default: 30)"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return status
    except CorralError as error:
        _fail(error, args)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`corral audit --json | head`): stop quietly, as `cat` would.
        # Python flushes stdout again at exit, so point it at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug, or something unforeseen: still one line, not a traceback
        if os.environ.get("CORRAL_DEBUG"):
            raise
        _fail(Internal(f"{type(error).__name__}: {error} (CORRAL_DEBUG=1 shows the traceback)"), args)
        return EXIT_ERROR


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("corral")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"corral {_version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--state-dir", help="state directory (default: $CORRAL_STATE_DIR, else ./.corral)")
        sub.set_defaults(run=run)
        return sub

    init = command(
        "init",
        _init,
        "write keys, credentials, the NATS configuration and the demo definitions into the state directory",
    )
    init.add_argument("--port", type=int, default=4222, help="the port nats.conf makes the broker listen on")
    init.add_argument("--no-demo", dest="demo", action="store_false", help="do not copy the demo definitions")
    init.add_argument("--listen", default="127.0.0.1", help="address the broker listens on")
    init.add_argument("--client-url", help="the broker's URL as clients reach it (written for corral request)")
    init.add_argument(
        "--cluster-node",
        metavar="NAME",
        help="make nats.conf one node of a NATS cluster, named NAME (each node its own name; copy "
        "secrets.json from the first node's state directory first, so every node shares its keys)",
    )
    init.add_argument("--cluster-port", type=int, default=6222, help="the port this node's routes listen on")
    init.add_argument(
        "--routes", default="", help="the other nodes' route URLs, comma-separated (nats://host:6222,...)"
    )

    up = command("up", _up, "start the broker and every service; Ctrl-C stops them")
    up.add_argument("--port", type=int, default=4222, help="broker port (0 picks a free one)")
    up.add_argument("--nats-url", help="use this running broker instead of starting one")
    up.add_argument("--scale", action="append", default=[], metavar="SERVICE=N", help="replicas of a service")
    up.add_argument("--log-dir", type=Path, help="write service logs here instead of the terminal")
    up.add_argument("--no-demo", dest="demo", action="store_false", help="do not copy the demo definitions")

    token = command("token", _token, "mint a development token for a tenant")
    token.add_argument("--tenant", required=True, help="the tenant the token is for")
    token.add_argument("--sub", default="dev", help="the token's principal, its sub (default: dev)")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until it expires (default: 3600)")
    token.add_argument("--scope", action="append", default=[], help="a scope the token holds (repeatable)")

    request = command("request", _request, "send a request as a tenant and print its events and result")
    request.add_argument("text", nargs="?", help="the input's text (input.text)")
    _identity_flags(request)
    request.add_argument("--target", help="route name (default: the tenant's default route)")
    request.add_argument("--session", help="a conversation's session (swarm and orchestrator routes) to go on with")
    request.add_argument("--input", type=_json_object, default={}, help="the input as a JSON object")
    request.add_argument("--timeout", type=float, default=30.0, help=TIMEOUT_HELP)
    request.add_argument("--json", action="store_true", help="machine-readable output")
    request.add_argument(
        "--idempotency-key", help="safe to run twice: sent once more if the replica running it gives it up"
    )
    request.add_argument(
        "--follow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show the run's progress events live (default; --no-follow: only the result)",
    )

    chat = command("chat", _chat, "talk with a swarm or an orchestrator route, turn by turn, in one session")
    _identity_flags(chat)
    chat.add_argument("--target", help="the route (default: the tenant's default route)")
    chat.add_argument("--session", help="go on with this session (default: a new one)")
    chat.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each turn (default: 120)")

    route = command("route", _route, "route rules: which route a request would take, and why")
    route_actions = route.add_subparsers(dest="action", required=True, metavar="ACTION")
    explain = route_actions.add_parser(
        "explain",
        help="the route a request would take, and every rule tried",
        description="the route a "
        "request would take from the definitions (no broker needed), every rule tried on the way",
    )
    explain.add_argument("text", nargs="?", help="the input's text (input.text)")
    explain.add_argument("--state-dir", help="state directory (default: $CORRAL_STATE_DIR, else ./.corral)")
    explain.add_argument("--tenant", required=True, help="the tenant whose rules decide")
    explain.add_argument("--target", help="a target named directly")
    explain.add_argument("--input", type=_json_object, default={}, help="the input as a JSON object")
    explain.add_argument("--sub", default="dev", help="the principal (principal.id)")
    explain.add_argument("--scope", action="append", default=[], help="a scope of the token (repeatable)")
    explain.add_argument("--definitions", help="definitions paths (default: the state directory's, CORRAL_DEFINITIONS)")
    explain.add_argument("--json", action="store_true", help="machine-readable output")

    tenant = command("tenant", _tenant, "add, update, remove and list tenants while the system runs (the registry)")
    tenant_actions = tenant.add_subparsers(dest="action", required=True, metavar="ACTION")

    def tenant_action(name: str, help: str) -> argparse.ArgumentParser:
        sub = tenant_actions.add_parser(name, help=help, description=help)
        sub.add_argument("--state-dir", help="state directory (default: $CORRAL_STATE_DIR, else ./.corral)")
        sub.add_argument("--nats-url", help="the broker (default: the running system's, from the state directory)")
        sub.add_argument("--definitions", help="definitions to check policies against (default: the state dir's)")
        sub.add_argument("--timeout", type=float, default=10.0, help=TIMEOUT_HELP)
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        return sub

    for verb, help in (
        ("add", "add a tenant: its policy from --file (YAML or JSON), or --like another tenant's"),
        ("update", "replace a tenant's policy with --file's"),
    ):
        sub = tenant_action(verb, help)
        sub.add_argument("tenant", nargs="?", help="the tenant id (default: the file's)")
        sub.add_argument("--file", type=Path, help="a tenant policy, or a definitions file with a tenants list")
        if verb == "add":
            sub.add_argument("--like", help="copy this tenant's policy (from the registry or the definitions)")
        else:
            sub.add_argument("--revision", type=int, help="only if the tenant is still at this revision")
    tenant_action("remove", "remove a tenant (a file declaring it does not bring it back)").add_argument(
        "tenant", help="the tenant id"
    )
    tenant_action("list", "every tenant in the registry")
    tenant_action("show", "one tenant's policy, origin and revision").add_argument("tenant", help="the tenant id")
    tenant_action("seed", "write the definitions files' tenants the registry lacks (corral up does this)")

    workflow = command("workflow", _workflow, "start, list, show, signal and cancel workflow runs")
    actions = workflow.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help, description=help)
        sub.add_argument("--state-dir", help="state directory (default: $CORRAL_STATE_DIR, else ./.corral)")
        _identity_flags(sub)
        sub.add_argument("--timeout", type=float, default=30.0, help=TIMEOUT_HELP)
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        return sub

    start = action("start", "start a run of a workflow route and follow it until it ends or waits")
    start.add_argument("target", help="the route (a workflow route of the tenant)")
    start.add_argument("--input", type=_json_object, default={}, help="the input as a JSON object")
    start.add_argument("--idempotency-key", help="the same key and input give back the same run")
    start.add_argument("--no-follow", dest="follow", action="store_false", help="print the run id and return")
    listing = action("list", "the tenant's runs, newest first")
    listing.add_argument("--status", help="only runs in this status (running, waiting, completed, failed, ...)")
    listing.add_argument("--limit", type=int, default=50, help="at most this many runs (default: 50)")
    show = action("show", "a run's history as a timeline: steps, attempts, timings, errors, approvals")
    show.add_argument("run_id", help="the run (its id, as start and list print it)")
    send = action("signal", "send a signal (an approval) to a run; --scope sends it as the holder of a scope")
    send.add_argument("run_id", help="the run (its id, as start and list print it)")
    send.add_argument("signal", help="the signal's name, the one its wait step waits for (approve)")
    send.add_argument("--data", type=_json_object, default={}, help="the signal's data as a JSON object")
    cancel = action("cancel", "cancel a run: its completed steps are compensated, in reverse order")
    cancel.add_argument("run_id", help="the run (its id, as start and list print it)")

    bench = command(
        "bench",
        _bench,
        "measure router -> graph -> tool round trips against a raw nats-py chain; "
        "corral bench workflow: workflow runs against Temporal, DBOS and raw JetStream; "
        "corral bench swarm: a three-agent conversation against the OpenAI Agents SDK and Strands",
    )
    bench.add_argument(
        "what",
        nargs="?",
        choices=("requests", "workflow", "swarm"),
        default="requests",
        help="what to measure (requests)",
    )
    bench.add_argument("--quick", action="store_true", help="workflow, swarm: small counts (a smoke run)")
    bench.add_argument("--nats-url", help="benchmark a running system (its state directory gives credentials)")
    bench.add_argument("--requests", type=int, default=2000, help="requests per throughput phase (2000)")
    bench.add_argument("--concurrency", type=int, default=64, help="requests in flight at once (64)")
    bench.add_argument("--rounds", type=int, default=5, help="rounds of both contenders, back to back")
    bench.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    bench.add_argument(
        "--tenants",
        type=int,
        help="requests: N generated tenants, each on its own connection, against one tenant (its own system)",
    )

    top = command("top", _top, "live per-tenant traffic from the monitor: rates, errors, denials, latencies")
    top.add_argument("--monitor-url", help="the monitor (default: $CORRAL_MONITOR_URL, else corral.json's)")
    top.add_argument("--token", help="a bearer token (default: the operator token in the state directory)")
    top.add_argument("--tenant", help="show this tenant's subject families instead of every tenant")
    top.add_argument("--limit", type=int, help="at most this many tenants, the busiest")
    top.add_argument("--once", action="store_true", help="print the table once and exit")
    top.add_argument("--json", action="store_true", help="print the monitor's answer once, as JSON")
    top.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each answer (default: 5)")

    audit = command("audit", _audit, "list a tenant's audit records and verify their hash chain")
    audit.add_argument("--tenant", required=True, help="whose records")
    audit.add_argument("--verify", action="store_true", help="check the chain; exit non-zero if it is broken")
    audit.add_argument("--nats-url", help=NATS_URL_HELP)
    audit.add_argument("--json", action="store_true", help="machine-readable output")

    ping = command(
        "ping",
        _ping,
        "ask a service's replicas whether they are up (exit 0 if one answers): the compose file's health check",
    )
    ping.add_argument("service", help=f"the service: {', '.join(SERVICE_NAMES)}")
    ping.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for answers (default: 2)")
    ping.add_argument("--nats-url", help=NATS_URL_HELP)
    ping.add_argument("--json", action="store_true", help="machine-readable output")

    validate = command(
        "validate",
        _validate,
        "check definitions: every problem at once, each as file:line: path.to.key: message; nothing when all is well",
    )
    validate.add_argument(
        "paths",
        nargs="*",
        type=Path,
        metavar="PATH",
        help="definitions files or folders (default: $CORRAL_DEFINITIONS, else the state directory's definitions/)",
    )

    schema = command("schema", _schema, "print the JSON Schema of a definitions file (for editors)")
    schema.add_argument("--reference", action="store_true", help="print the generated Markdown reference instead")

    asyncapi = command("asyncapi", _asyncapi, "print the AsyncAPI document of the bus API")
    asyncapi.add_argument("--format", choices=("yaml", "json"), default="yaml", help="the document's format (yaml)")
    asyncapi.add_argument(
        "--definitions",
        type=Path,
        action="append",
        metavar="PATH",
        help="also show the input schema of each graph these definitions route to (repeatable)",
    )
    return parser


def _identity_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", help="tenant to act as (a development token is minted)")
    parser.add_argument("--token", help="application JWT (its tenant claim decides the tenant)")
    parser.add_argument("--sub", default="dev", help="the principal of a minted development token")
    parser.add_argument("--scope", help="a scope the minted token holds, and that a signal is sent as the holder of")
    parser.add_argument("--nats-url", help=NATS_URL_HELP)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _fail(error: CorralError | str, args: argparse.Namespace) -> None:
    """Report an error: one line on stderr, or with ``--json`` one object on stdout (a plain
    message is reported as ``invalid_request``)."""
    if isinstance(error, str):
        error = InvalidRequest(error)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": {"code": error.code.value, "message": error.message}}), flush=True)
    else:
        print(f"error: {error.code.value}: {error.message}", file=sys.stderr, flush=True)


def _secrets(state_dir: Path) -> Any:
    """The state directory's secrets, or a clear error when they cannot be read."""
    try:
        return load_secrets(state_dir)
    except PermissionError:
        raise Forbidden(
            f"cannot read {state_dir}/secrets.json: permission denied (was it written by another user, a"
            " container's root? see docs/docker.md)"
        ) from None
    except (OSError, ValueError, KeyError) as error:
        raise NotFound(f"cannot read the secrets in {state_dir}: {error}") from None


def _broker_url(args: argparse.Namespace) -> tuple[str, str]:
    """The broker's URL, and where it came from: ``--nats-url``, else ``$CORRAL_NATS_URL``, else
    the ``corral.json`` a running ``corral up`` writes into its state directory."""
    if getattr(args, "nats_url", None):
        return args.nats_url, "--nats-url"
    if os.environ.get("CORRAL_NATS_URL"):
        return os.environ["CORRAL_NATS_URL"], "$CORRAL_NATS_URL"
    state_dir = existing_state_dir(args.state_dir)
    try:
        info = read_runtime_info(state_dir)
    except (OSError, ValueError) as error:
        raise NotFound(f"cannot read {state_dir / RUNTIME_FILE}: {error}") from None
    if not info or not info.get("nats_url"):
        raise NotFound(
            f"no running system found in {state_dir} (no {RUNTIME_FILE}: corral up writes it while it runs);"
            " start one with `corral up`, or pass --nats-url"
        )
    return str(info["nats_url"]), str(state_dir / RUNTIME_FILE)


# A command's connection: one attempt (and one retry 50 ms later), never a reconnection. nats-py
# retries for ever with max_reconnect_attempts=0, so a dead URL used to hang the command.
ONE_SHOT: dict[str, Any] = {"allow_reconnect": False, "max_reconnect_attempts": 1, "reconnect_time_wait": 0.05}


def _connect_failure(url: str, source: str, error: BaseException, seen: list[Exception]) -> CorralError:
    """What a failed connection to the broker means, as a typed error with one clear line."""
    if isinstance(error, CorralError):  # the client's own finding (a token of another tenant)
        return error
    causes = [*seen, error]
    if any("authorization violation" in str(cause).lower() for cause in causes):
        return Unauthorized(f"the broker at {url} refused the token (Authorization Violation)")
    cause = next((c for c in reversed(causes) if isinstance(c, OSError) and str(c)), None)
    reason = str(cause) if cause is not None else (str(error) or type(error).__name__)
    if isinstance(error, TimeoutError) and cause is None:
        reason = "no answer in time"
    stale = "; is the corral up that wrote it still running?" if source.endswith(RUNTIME_FILE) else ""
    return Unavailable(f"cannot reach the broker at {url} (from {source}): {reason}{stale}")


async def _connect(url: str, source: str, timeout: float, connect: Any) -> Any:
    """Run ``connect(options)`` (one-shot options, with an error callback), within ``timeout``."""
    seen: list[Exception] = []

    async def noted(error: Exception) -> None:
        seen.append(error)

    options = {**ONE_SHOT, "connect_timeout": max(0.1, min(5.0, timeout)), "error_cb": noted}
    try:
        return await asyncio.wait_for(connect(options), timeout=max(0.1, timeout))
    except (Exception, TimeoutError) as error:
        raise _connect_failure(url, source, error, seen) from None


# ---- commands ------------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    init_state(state_dir, host=args.listen, port=args.port, demo=args.demo)
    if args.cluster_node:
        routes = [route.strip() for route in args.routes.split(",") if route.strip()]
        make_cluster_node(
            state_dir, name=args.cluster_node, port=args.port, cluster_port=args.cluster_port, routes=routes
        )
        print(f"nats.conf is node {args.cluster_node!r} of a cluster (set CORRAL_JETSTREAM_REPLICAS=3 everywhere)")
    if args.client_url:
        write_runtime_info(state_dir, {"nats_url": args.client_url})
    print(
        f"wrote {state_dir}/nats.conf and {state_dir}/secrets.json; definitions are read from {state_dir}/definitions"
    )
    return 0


def _up(args: argparse.Namespace) -> int:
    from corral.nats_server import BrokerError, free_port
    from corral.system import DefinitionsInvalid, StartInterrupted, StateDirBusy, SupervisionError, System
    from services.registry import NAMES

    replicas: dict[str, int] = {}
    for item in args.scale:
        name, _, count = item.partition("=")
        if name not in NAMES or not count.isdigit():
            print(f"error: --scale takes SERVICE=N with SERVICE one of {', '.join(NAMES)}", file=sys.stderr)
            return EXIT_USAGE
        replicas[name] = int(count)
    state_dir = resolve_state_dir(args.state_dir)
    port = args.port or free_port()
    system = System(
        state_dir, port=port, nats_url=args.nats_url, replicas=replicas, log_dir=args.log_dir, demo=args.demo
    )

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGHUP too: a closed terminal must stop the system the same way, not orphan it.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        try:
            await system.start(stop=stop)
        except StartInterrupted as interrupted:  # start() stopped what it had started
            print(interrupted, flush=True)
            return 0
        try:
            _print_welcome(system, state_dir)
            await system.supervise(stop)
            print("stopping...", flush=True)
        except SupervisionError as error:
            print(f"error: {error}\nstopping everything...", file=sys.stderr, flush=True)
            return EXIT_ERROR
        finally:
            system.stop()
        return 0

    try:
        return event_loop.run(run())
    except (BrokerError, StateDirBusy) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except DefinitionsInvalid as invalid:
        problems = f"{invalid.count} problem{'s' if invalid.count > 1 else ''}"
        print(f"error: the definitions have {problems}; nothing was started:\n{invalid}", file=sys.stderr, flush=True)
        return EXIT_ERROR


def _print_welcome(system: Any, state_dir: Path) -> None:
    flag = "" if state_dir == resolve_state_dir(None) else f" --state-dir {state_dir}"
    print(f"Corral is up: NATS at {system.url}, state in {state_dir}", flush=True)
    print(f'  try:   corral request{flag} --tenant acme "where is my order?"', flush=True)
    print(f'         corral request{flag} --tenant globex "where is my order?"', flush=True)
    print(
        f'         corral workflow start{flag} --tenant acme refund --input \'{{"order_id": "A-1002"}}\'',
        flush=True,
    )
    if system.payments_url:
        print(f"  refunds reach the demo payments API: curl {system.payments_url}/v1/acme/refunds", flush=True)
    print("  Ctrl-C stops everything; a process that exits is restarted (docs/operations.md).", flush=True)


def _token(args: argparse.Namespace) -> int:
    from services.auth.tokens import mint_dev_token

    secrets = _secrets(existing_state_dir(args.state_dir))
    print(mint_dev_token(args.tenant, key=secrets.dev_key, sub=args.sub, ttl_s=args.ttl, scopes=tuple(args.scope)))
    return 0


def _connection(args: argparse.Namespace) -> tuple[str, str, str, str]:
    """(url, where it came from, tenant, token) from the flags and the state directory."""
    import jwt

    from contracts.tenants import validate_tenant_id
    from services.auth.tokens import mint_dev_token

    if args.tenant:
        validate_tenant_id(args.tenant)
    if args.token:
        # The tenant only picks the inbox prefix; the broker grants permissions from the verified token.
        try:
            claims = jwt.decode(args.token, options={"verify_signature": False})
        except jwt.PyJWTError as error:
            raise Unauthorized(f"--token is not a JWT ({error})") from None
        claimed = claims.get("tenant_id")
        if args.tenant and isinstance(claimed, str) and claimed != args.tenant:
            raise TenantMismatch(
                f"the token is for tenant {claimed!r}, not {args.tenant!r}: leave out --tenant, or use a token"
                f" of {args.tenant!r}"
            )
        tenant = args.tenant or claimed
        if not isinstance(tenant, str) or not tenant:
            raise InvalidRequest("pass --tenant with a token whose tenant claim is not 'tenant_id'")
        url, source = _broker_url(args)
        return url, source, validate_tenant_id(tenant), args.token
    if not args.tenant:
        raise InvalidRequest("pass --tenant (or --token)")
    url, source = _broker_url(args)
    scopes = (args.scope,) if getattr(args, "scope", None) else ()
    key = _secrets(existing_state_dir(args.state_dir)).dev_key
    token = mint_dev_token(args.tenant, key=key, sub=getattr(args, "sub", "dev"), scopes=scopes)
    return url, source, args.tenant, token


async def _client(args: argparse.Namespace) -> Any:
    """A tenant connection from the flags, within ``--timeout``; a typed error if there is none."""
    from corral.client import CorralClient

    url, source, tenant, token = _connection(args)
    return await _connect(
        url,
        source,
        args.timeout,
        lambda options: CorralClient.connect(url, tenant=tenant, token=token, **options),
    )


def _show_event(args: argparse.Namespace) -> Any:
    def show(event: RunEvent) -> None:
        if not args.json:
            where = f" {event.node}" if event.node else ""
            timing = f" ({event.elapsed_ms:.1f} ms)" if event.elapsed_ms is not None else ""
            details = f" {json.dumps(event.data)}" if event.data else ""
            print(f"[{event.service}] {event.type.value}{where}{timing}{details}", flush=True)

    return show


def _request(args: argparse.Namespace) -> int:
    async def run() -> int:
        client = await _client(args)
        try:
            result = await client.request(
                args.text,
                target=args.target,
                input=args.input,
                timeout=args.timeout,
                on_event=_show_event(args),
                watch=args.follow,
                idempotency_key=args.idempotency_key,
                session=args.session,
            )
        finally:
            await client.close()
        if args.json:
            print(
                json.dumps(
                    {
                        "ok": True,
                        "run_id": result.run_id,
                        "output": result.output,
                        "events": [event.model_dump(mode="json") for event in result.events],
                    }
                )
            )
        else:
            print(result.output if isinstance(result.output, str) else json.dumps(result.output, indent=2))
        return 0

    return event_loop.run(run())


def _chat(args: argparse.Namespace) -> int:
    """One conversation in the terminal: each line typed is a turn; who speaks, the tools it
    calls, the handoffs and the tokens are shown as they happen."""

    def shown(event: Any) -> None:
        data, kind = event.data, event.type.value
        if kind == "agent_started":
            print(f"  [{data.get('agent')}]", flush=True)
        elif kind == "tool_called":
            print(f"  [{data.get('agent')}] calls {data.get('tool')}", flush=True)
        elif kind == "handoff":
            reason = f": {data['reason']}" if data.get("reason") else ""
            print(f"  [{data.get('from')}] hands off to {data.get('to')}{reason}", flush=True)
        elif kind == "limit_reached":
            print(f"  limit reached ({data.get('limit')}): {data.get('message')}", flush=True)

    async def run() -> int:
        client = await _client(args)
        session = args.session
        try:
            print("Type a message and press Enter; an empty line or Ctrl-D ends the conversation.", flush=True)
            while True:
                try:
                    text = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    break
                if not text.strip():
                    break
                try:
                    result = await client.request(
                        text, target=args.target, timeout=args.timeout, on_event=shown, session=session
                    )
                except CorralError as error:
                    print(f"  error ({error.code.value}): {error.message}", flush=True)
                    continue
                answer = result.output if isinstance(result.output, dict) else {"message": result.output}
                session = answer.get("session", session)
                print(f"{answer.get('agent', 'corral')}> {answer.get('message')}", flush=True)
                print(f"  (session {session}, {answer.get('tokens', 0)} tokens)", flush=True)
        finally:
            await client.close()
        return 0

    return event_loop.run(run())


def _definitions_paths(args: argparse.Namespace) -> list[Path]:
    """``--definitions``, else ``CORRAL_DEFINITIONS``, else the state directory's ``definitions/``."""
    from services.runtime.settings import split_paths

    if getattr(args, "definitions", None):
        return split_paths(args.definitions)
    if os.environ.get("CORRAL_DEFINITIONS"):
        return split_paths(os.environ["CORRAL_DEFINITIONS"])
    return [existing_state_dir(args.state_dir) / "definitions"]


def _tenant(args: argparse.Namespace) -> int:
    """``corral tenant add|update|remove|list|show|seed``: the tenant registry, as the operator."""
    from corral.tenant_command import run

    return event_loop.run(run(args, lambda: _admin(args, timeout=args.timeout), lambda: _definitions_paths(args)))


def _route(args: argparse.Namespace) -> int:
    """``corral route explain``: the router's decision for a request, from the definitions alone."""
    from services.router.policy import Router
    from services.runtime.catalog import load_catalog

    catalog = load_catalog(_definitions_paths(args))
    router = Router(catalog)
    policy = router.policy_for(args.tenant)
    text_input = {"text": args.text} if args.text is not None else {}
    facts_input = {**args.input, **text_input}
    decision = router.decide(args.tenant, args.target, facts_input, principal=args.sub, scopes=frozenset(args.scope))
    tried = [{"route": name, "when": policy.routes[name].when, "holds": False} for name in decision.passed]
    if decision.chosen_by == "when":
        tried.append({"route": decision.target, "when": decision.route.when, "holds": True})
    answer = {
        "tenant": args.tenant,
        "target": decision.target,
        "pattern": decision.route.pattern.value,
        "runs": decision.route.runs,
        "chosen_by": decision.chosen_by,
        "tried": tried,
    }
    if args.json:
        print(json.dumps(answer))
        return 0
    for step in tried:
        print(f"  {'holds' if step['holds'] else 'no   '}  {step['route']}: when {step['when']}")
    why = {"target": "named by the request", "when": "its rule holds", "default_route": "the tenant's default route"}
    print(f"{decision.target} ({decision.route.pattern.value} {decision.route.runs}): {why[decision.chosen_by]}")
    return 0


def _workflow(args: argparse.Namespace) -> int:
    from corral.workflow_view import timeline

    async def run() -> int:
        client = await _client(args)
        try:
            if args.action == "start":
                if not args.json:
                    print(f"starting {args.target} ...", flush=True)
                result = await client.request(
                    target=args.target,
                    input=args.input,
                    timeout=args.timeout,
                    on_event=_show_event(args),
                    idempotency_key=args.idempotency_key,
                    follow=args.follow,
                )
                answer: Any = {"run_id": result.run_id, "output": result.output}
            elif args.action == "list":
                answer = await client.runs(status=args.status, limit=args.limit, timeout=args.timeout)
            elif args.action == "show":
                answer = await client.show(args.run_id, timeout=args.timeout)
            elif args.action == "signal":
                answer = await client.signal(
                    args.run_id, args.signal, args.data, scope=args.scope, timeout=args.timeout
                )
            else:
                answer = await client.cancel(args.run_id, scope=args.scope, timeout=args.timeout)
        finally:
            await client.close()
        if args.json:
            print(json.dumps({"ok": True, "result": answer}))
        elif args.action == "show":
            print(timeline(answer))
        elif args.action == "list":
            for run in answer:
                print(f"{run['run_id']}  {run['workflow']:<16} {run['status']:<11} {run.get('principal') or ''}")
        else:
            print(json.dumps(answer, indent=2))
        return 0

    return event_loop.run(run())


def _bench(args: argparse.Namespace) -> int:
    if args.what == "workflow":
        from corral.bench.workflow import run_workflow_bench, table

        report = event_loop.run(run_workflow_bench(quick=args.quick, quiet=args.json))
        print(json.dumps(report) if args.json else table(report))
        return 0
    if args.what == "swarm":
        from corral.bench.swarm import run_swarm_bench
        from corral.bench.swarm import table as swarm_table

        report = event_loop.run(run_swarm_bench(quick=args.quick, quiet=args.json))
        print(json.dumps(report) if args.json else swarm_table(report))
        return 0
    if args.tenants is not None:
        from corral.bench.tenants import run_tenants_bench
        from corral.bench.tenants import table as tenants_table

        if args.what != "requests" or args.nats_url or args.tenants < 1:
            raise InvalidRequest("--tenants N (N >= 1) measures requests, on a system of its own (no --nats-url)")
        report = event_loop.run(
            run_tenants_bench(
                tenants=args.tenants,
                requests=args.requests,
                concurrency=args.concurrency,
                rounds=max(1, args.rounds),
                quiet=args.json,
            )
        )
        print(json.dumps(report) if args.json else tenants_table(report))
        return 0
    from corral.bench import run_bench

    report = event_loop.run(
        run_bench(
            state_dir=existing_state_dir(args.state_dir) if args.nats_url else None,
            nats_url=args.nats_url,
            requests=args.requests,
            concurrency=args.concurrency,
            rounds=max(1, args.rounds),
            quiet=args.json,
        )
    )
    if args.json:
        print(json.dumps(report))
    return 0


def _top(args: argparse.Namespace) -> int:
    from contracts.tenants import validate_tenant_id
    from corral.top import monitor_url, operator_token, run_top

    if args.tenant:
        validate_tenant_id(args.tenant)
    base_url, _ = monitor_url(args.monitor_url, args.state_dir)
    token = args.token or operator_token(args.state_dir)
    return run_top(
        base_url=base_url,
        token=token,
        tenant=args.tenant,
        limit=args.limit,
        once=args.once,
        as_json=args.json,
        timeout=args.timeout,
    )


def _audit(args: argparse.Namespace) -> int:
    from contracts.tenants import validate_tenant_id
    from corral.audit_reader import read_trail_on

    validate_tenant_id(args.tenant)

    async def read() -> Any:
        nc = await _admin(args, timeout=10.0)
        try:
            return await read_trail_on(nc, args.tenant)
        finally:
            await nc.close()

    report = event_loop.run(read())
    if args.json:
        print(
            json.dumps(
                {
                    "tenant": args.tenant,
                    "records": [record.model_dump(mode="json") for record in report.records],
                    "entries": len(report.entries),
                    "intact": not report.problems,
                    "problems": [{"sequence": p.sequence, "problem": p.problem} for p in report.problems],
                }
            )
        )
    else:
        for record in report.records:
            detail = " ".join(f"{key}={value}" for key, value in record.detail.items())
            print(f"{record.at} {record.service:<7} {record.action:<24} {record.outcome:<8} {detail}")
        if args.verify:
            for problem in report.problems:
                print(f"BROKEN at stream sequence {problem.sequence}: {problem.problem}")
            if not report.problems:
                print(f"chain intact: {len(report.entries)} entries, {len(report.records)} records")
    return EXIT_ERROR if args.verify and report.problems else 0


def _validate(args: argparse.Namespace) -> int:
    from services.runtime.catalog import check_definitions, configured_paths

    setting = os.environ.get("CORRAL_DEFINITIONS")
    paths = args.paths or configured_paths(setting, resolve_state_dir(args.state_dir))
    if not args.paths and not setting and not paths[0].exists():
        _fail(f"no definitions at {paths[0]}: `corral init` copies the demo's there; or pass a PATH", args)
        return EXIT_ERROR
    checked = check_definitions(paths, imports=True)
    for problem in checked.problems:
        print(problem)
    if checked.problems:
        count = len(checked.problems)
        print(f"{count} problem{'s' if count > 1 else ''} in the definitions", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _schema(args: argparse.Namespace) -> int:
    from corral.definitions_reference import render_reference, render_schema

    print(render_reference() if args.reference else render_schema(), end="")
    return 0


async def _admin(args: argparse.Namespace, *, timeout: float) -> Any:
    """The operator's connection (the state directory's ``admin`` user), within ``timeout``."""
    import nats

    url, source = _broker_url(args)
    password = _secrets(existing_state_dir(args.state_dir)).passwords[ADMIN_USER]
    return await _connect(
        url,
        source,
        timeout,
        lambda options: nats.connect(
            url, user=ADMIN_USER, password=password, inbox_prefix=subjects.service_inbox_prefix(ADMIN_USER), **options
        ),
    )


def _ping(args: argparse.Namespace) -> int:
    """Ping a service's replicas; exit 0 if one answered within the timeout."""
    if args.service not in SERVICE_NAMES:
        raise InvalidRequest(f"no service {args.service!r}; the services are {', '.join(SERVICE_NAMES)}")

    async def run() -> list[dict[str, Any]]:
        started = time.monotonic()
        nc = await _admin(args, timeout=args.timeout)
        try:
            left = max(0.05, args.timeout - (time.monotonic() - started))
            return await ping_replicas(nc, args.service, left)
        finally:
            await nc.close()

    replicas = event_loop.run(run())
    if not replicas:
        raise Unavailable(f"no replica of {args.service} answered within {args.timeout:g} s")
    if args.json:
        print(json.dumps({"ok": True, "service": args.service, "replicas": replicas}))
    else:
        for replica in replicas:
            name = replica.get("name") or f"{args.service}-{replica.get('pid')}"
            print(f"{name}  pid {replica.get('pid')}  in flight {replica.get('in_flight')}  {replica['ms']:.1f} ms")
    return 0


async def ping_replicas(nc: Any, service: str, timeout: float, settle: float = 0.2) -> list[dict[str, Any]]:
    """Every replica of ``service`` that answers its ping: waits for the first answer up to
    ``timeout``, then ``settle`` seconds more for the others (each reply names its replica)."""
    inbox = nc.new_inbox()
    answers: list[dict[str, Any]] = []
    first = asyncio.Event()
    sent = time.monotonic()

    async def on_answer(msg: Any) -> None:
        if not msg.data:  # an empty message is the broker's "no responders" status
            return
        with contextlib.suppress(ValueError):
            answer = json.loads(msg.data)
            if isinstance(answer, dict):
                answers.append({**answer, "ms": (time.monotonic() - sent) * 1000})
                first.set()

    subscription = await nc.subscribe(inbox, cb=on_answer)
    try:
        await nc.flush()
        await nc.flush()  # the subscription is in place before the ping goes out
        sent = time.monotonic()
        await nc.publish(subjects.ping(service), b"", reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first.wait(), timeout=timeout)
            await asyncio.sleep(min(settle, max(0.0, timeout - (time.monotonic() - sent))))  # the others' answers
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    return sorted(answers, key=lambda answer: str(answer.get("name") or answer.get("pid")))


def _asyncapi(args: argparse.Namespace) -> int:
    from corral.asyncapi import render_asyncapi
    from services.runtime.catalog import load_catalog

    catalog = load_catalog(args.definitions) if args.definitions else None
    print(render_asyncapi(args.format, catalog), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
