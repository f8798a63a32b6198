"""The ``corral`` command: run the system, mint development tokens, send requests, benchmark."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from contracts.envelope import RunEvent
from contracts.errors import CorralError
from corral.state import ADMIN_USER, init_state, read_runtime_info, resolve_state_dir, write_runtime_info
from services.runtime import loop as event_loop
from services.runtime.credentials import load_secrets

EXIT_ERROR = 1
EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except CorralError as error:
        _fail(f"{error.code.value}: {error.message}", args)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description=__doc__)
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
    init.add_argument("--port", type=int, default=4222)
    init.add_argument("--no-demo", dest="demo", action="store_false", help="do not copy the demo definitions")
    init.add_argument("--listen", default="127.0.0.1", help="address the broker listens on")
    init.add_argument("--client-url", help="URL clients should use (written for `corral request`)")

    up = command("up", _up, "start the broker and every service; Ctrl-C stops them")
    up.add_argument("--port", type=int, default=4222, help="broker port (0 picks a free one)")
    up.add_argument("--nats-url", help="use this running broker instead of starting one")
    up.add_argument("--scale", action="append", default=[], metavar="SERVICE=N", help="replicas of a service")
    up.add_argument("--log-dir", type=Path, help="write service logs here instead of the terminal")
    up.add_argument("--no-demo", dest="demo", action="store_false", help="do not copy the demo definitions")

    token = command("token", _token, "mint a development token for a tenant")
    token.add_argument("--tenant", required=True)
    token.add_argument("--sub", default="dev")
    token.add_argument("--ttl", type=int, default=3600, help="seconds")
    token.add_argument("--scope", action="append", default=[], help="a scope the token holds (repeatable)")

    request = command("request", _request, "send a request as a tenant and print its events and result")
    request.add_argument("text", nargs="?", help="the input's text (input.text)")
    _identity_flags(request)
    request.add_argument("--target", help="route name (default: the tenant's default route)")
    request.add_argument("--input", type=_json_object, default={}, help="the input as a JSON object")
    request.add_argument("--timeout", type=float, default=30.0)
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

    workflow = command("workflow", _workflow, "start, list, show, signal and cancel workflow runs")
    actions = workflow.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help, description=help)
        sub.add_argument("--state-dir", help="state directory (default: $CORRAL_STATE_DIR, else ./.corral)")
        _identity_flags(sub)
        sub.add_argument("--timeout", type=float, default=30.0)
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        return sub

    start = action("start", "start a run of a workflow route and follow it until it ends or waits")
    start.add_argument("target", help="the route (a workflow route of the tenant)")
    start.add_argument("--input", type=_json_object, default={}, help="the input as a JSON object")
    start.add_argument("--idempotency-key", help="the same key and input give back the same run")
    start.add_argument("--no-follow", dest="follow", action="store_false", help="print the run id and return")
    listing = action("list", "the tenant's runs, newest first")
    listing.add_argument("--status", help="only runs in this status (running, waiting, completed, failed, ...)")
    listing.add_argument("--limit", type=int, default=50)
    show = action("show", "a run's history as a timeline: steps, attempts, timings, errors, approvals")
    show.add_argument("run_id")
    send = action("signal", "send a signal (an approval) to a run; --scope sends it as the holder of a scope")
    send.add_argument("run_id")
    send.add_argument("signal")
    send.add_argument("--data", type=_json_object, default={}, help="the signal's data as a JSON object")
    cancel = action("cancel", "cancel a run: its completed steps are compensated, in reverse order")
    cancel.add_argument("run_id")

    bench = command(
        "bench",
        _bench,
        "measure router -> graph -> tool round trips against a raw nats-py chain; "
        "`corral bench workflow`: workflow runs against Temporal, DBOS and raw JetStream",
    )
    bench.add_argument("what", nargs="?", choices=("requests", "workflow"), default="requests")
    bench.add_argument("--quick", action="store_true", help="workflow: small counts (a smoke run)")
    bench.add_argument("--nats-url", help="benchmark a running system (its state directory gives credentials)")
    bench.add_argument("--requests", type=int, default=2000)
    bench.add_argument("--concurrency", type=int, default=64)
    bench.add_argument("--rounds", type=int, default=5, help="rounds of both contenders, back to back")
    bench.add_argument("--json", action="store_true")

    audit = command("audit", _audit, "list a tenant's audit records and verify their hash chain")
    audit.add_argument("--tenant", required=True)
    audit.add_argument("--verify", action="store_true", help="check the chain; exit non-zero if it is broken")
    audit.add_argument("--nats-url")
    audit.add_argument("--json", action="store_true")

    asyncapi = command("asyncapi", _asyncapi, "print the AsyncAPI document of the bus API")
    asyncapi.add_argument("--format", choices=("yaml", "json"), default="yaml")
    return parser


def _identity_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", help="tenant to act as (a development token is minted)")
    parser.add_argument("--token", help="application JWT (its tenant claim decides the tenant)")
    parser.add_argument("--sub", default="dev", help="the principal of a minted development token")
    parser.add_argument("--scope", help="a scope the minted token holds, and that a signal is sent as the holder of")
    parser.add_argument("--nats-url")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _fail(message: str, args: argparse.Namespace) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": message}))
    else:
        print(f"error: {message}", file=sys.stderr)


# ---- commands ------------------------------------------------------------------------------


def _init(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    init_state(state_dir, host=args.listen, port=args.port, demo=args.demo)
    if args.client_url:
        write_runtime_info(state_dir, {"nats_url": args.client_url})
    print(
        f"wrote {state_dir}/nats.conf and {state_dir}/secrets.json; definitions are read from {state_dir}/definitions"
    )
    return 0


def _up(args: argparse.Namespace) -> int:
    from corral.nats_server import BrokerError, free_port
    from corral.system import StartInterrupted, StateDirBusy, SupervisionError, System
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

    secrets = load_secrets(resolve_state_dir(args.state_dir))
    print(mint_dev_token(args.tenant, key=secrets.dev_key, sub=args.sub, ttl_s=args.ttl, scopes=tuple(args.scope)))
    return 0


def _connection(args: argparse.Namespace) -> tuple[str, str, str]:
    """(url, tenant, token) from flags, falling back to the running system's state directory."""
    import jwt

    from services.auth.tokens import mint_dev_token

    state_dir = resolve_state_dir(args.state_dir)
    info = read_runtime_info(state_dir) or {}
    url = args.nats_url or info.get("nats_url")
    if url is None:
        raise SystemExit(
            f"error: no running system found in {state_dir}; start one with `corral up` or pass --nats-url"
        )
    if args.token:
        # The tenant only picks the inbox prefix; the broker grants permissions from the verified token.
        claims = jwt.decode(args.token, options={"verify_signature": False})
        tenant = args.tenant or claims.get("tenant_id")
        if not tenant:
            raise SystemExit("error: pass --tenant with a token whose tenant claim is not 'tenant_id'")
        return url, tenant, args.token
    if not args.tenant:
        raise SystemExit("error: pass --tenant (or --token)")
    scopes = (args.scope,) if getattr(args, "scope", None) else ()
    key = load_secrets(state_dir).dev_key
    return url, args.tenant, mint_dev_token(args.tenant, key=key, sub=getattr(args, "sub", "dev"), scopes=scopes)


async def _client(args: argparse.Namespace) -> Any:
    """A tenant connection from the flags; None (reported) if the broker refused it."""
    from corral.client import CorralClient

    url, tenant, token = _connection(args)
    try:
        return await CorralClient.connect(
            url, tenant=tenant, token=token, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0
        )
    except Exception as exc:
        _fail(f"unauthorized: could not connect as tenant {tenant!r} ({exc or type(exc).__name__})", args)
        return None


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
        if client is None:
            return EXIT_ERROR
        try:
            result = await client.request(
                args.text,
                target=args.target,
                input=args.input,
                timeout=args.timeout,
                on_event=_show_event(args),
                watch=args.follow,
                idempotency_key=args.idempotency_key,
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


def _workflow(args: argparse.Namespace) -> int:
    from corral.workflow_view import timeline

    async def run() -> int:
        client = await _client(args)
        if client is None:
            return EXIT_ERROR
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
    from corral.bench import run_bench

    report = event_loop.run(
        run_bench(
            state_dir=resolve_state_dir(args.state_dir) if args.nats_url else None,
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


def _audit(args: argparse.Namespace) -> int:
    from contracts.tenants import validate_tenant_id
    from corral.audit_reader import read_trail

    validate_tenant_id(args.tenant)
    state_dir = resolve_state_dir(args.state_dir)
    url = args.nats_url or (read_runtime_info(state_dir) or {}).get("nats_url")
    if url is None:
        raise SystemExit(f"error: no running system found in {state_dir}; pass --nats-url")
    report = event_loop.run(read_trail(url, "admin", load_secrets(state_dir).passwords[ADMIN_USER], args.tenant))
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


def _asyncapi(args: argparse.Namespace) -> int:
    from corral.asyncapi import render_asyncapi

    print(render_asyncapi(args.format), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
