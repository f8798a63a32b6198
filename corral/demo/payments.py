"""The demo payments provider: a small HTTP API that refunds an order once per idempotency key.

The demo refund workflow's ``issue_refund`` is an HTTP tool that posts here (see
``corral/demo/definitions/refund.yaml``); ``corral up`` runs it next to the services. It behaves
as Stripe-style payment APIs do, so the workflow engine's idempotency keys can be seen at work:

    POST /v1/<tenant>/refunds   {"order_id": "A-1001", "amount": 40}, header Idempotency-Key (required)
        201: the new refund {id, order_id, amount, tenant, status, idempotency_key, created_at};
        the same key and body again: 200, the same refund, header ``Idempotent-Replayed: true``;
        the same key with another body: 409; no key: 400
    GET  /v1/<tenant>/refunds   {"refunds": [...]}: the tenant's refunds, oldest first

Every tenant's refunds and keys are its own: the path's tenant is the only one a request sees.
Errors are JSON ``{"error": {"code": ..., "message": ...}}``. The state is kept in memory and,
with ``--state FILE``, written to that JSON file before each answer that created a refund, so a
restarted provider still knows every key.

Run it: ``python -m corral.demo.payments --host 127.0.0.1 --port 8790 [--state FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog

from contracts.tenants import InvalidIdentifier, validate_tenant_id

# The variable that carries this API's base URL to the services (the refund tool's URL names it).
URL_VARIABLE = "CORRAL_DEMO_PAYMENTS_URL"
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
MAX_BODY_BYTES = 64 * 1024
MAX_AMOUNT = 1000  # larger refunds are refused, as a real provider refuses past a limit
FIELDS = frozenset({"order_id", "amount"})
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

log = structlog.get_logger(service="payments")


# ---- errors ----------------------------------------------------------------------------------


class PaymentsError(Exception):
    """A refused request: its HTTP status and a stable code, sent as JSON."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidRefund(PaymentsError):
    """The body is not ``{"order_id": <text>, "amount": <positive number>}``."""


class IdempotencyKeyRequired(PaymentsError):
    """A POST without an ``Idempotency-Key``: this provider never creates a refund it could not
    recognise again."""

    code = "idempotency_key_required"


class IdempotencyKeyReused(PaymentsError):
    """The key was used before with another body: the request is not a retry of that one."""

    status = 409
    code = "idempotency_key_reused"


class AmountOverLimit(PaymentsError):
    status = 422
    code = "amount_over_limit"


class NotFound(PaymentsError):
    status = 404
    code = "not_found"


class MethodNotAllowed(PaymentsError):
    status = 405
    code = "method_not_allowed"


# ---- the ledger: refunds and keys, per tenant --------------------------------------------------


class RefundLedger:
    """Refunds by tenant, and which refund each ``(tenant, idempotency key)`` created.

    Thread-safe (one lock: the check of a key and the creation of its refund are one step, so
    two concurrent tries of one key create one refund). With ``path``, loaded from and written
    to that JSON file."""

    def __init__(self, path: Path | None = None, *, max_amount: float = MAX_AMOUNT) -> None:
        self.path = path
        self.max_amount = max_amount
        self._lock = threading.Lock()
        self._entries: list[dict[str, Any]] = []  # {tenant, key, body, refund}, in creation order
        self._by_key: dict[tuple[str, str], dict[str, Any]] = {}
        if path is not None and path.exists():
            for entry in json.loads(path.read_text())["refunds"]:
                self._add(entry)

    def refund(self, tenant: str, key: str | None, body: Any) -> tuple[dict[str, Any], bool]:
        """The refund for this key: created now (``False``) or the one the key created before
        (``True``, a replay). Raises a :class:`PaymentsError` for what it refuses."""
        if not key:
            raise IdempotencyKeyRequired(f"a refund needs an {IDEMPOTENCY_HEADER} header")
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidRefund(f"the {IDEMPOTENCY_HEADER} is longer than {MAX_KEY_LENGTH} characters")
        order_id, amount = _refund_fields(body)
        with self._lock:
            entry = self._by_key.get((tenant, key))
            if entry is not None:
                if entry["body"] != body:
                    raise IdempotencyKeyReused(f"the {IDEMPOTENCY_HEADER} {key!r} was used for another refund request")
                return entry["refund"], True
            if amount > self.max_amount:
                raise AmountOverLimit(f"a refund of {amount} is over the limit of {self.max_amount}")
            refund = {
                "id": f"re_{uuid.uuid4().hex[:16]}",
                "order_id": order_id,
                "amount": amount,
                "tenant": tenant,
                "status": "succeeded",
                "idempotency_key": key,
                "created_at": datetime.now(UTC).isoformat(),
            }
            self._add({"tenant": tenant, "key": key, "body": body, "refund": refund})
            self._save()
        log.info("refund_created", tenant_id=tenant, refund_id=refund["id"], order_id=order_id, amount=amount)
        return refund, False

    def refunds(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's refunds, oldest first."""
        with self._lock:
            return [entry["refund"] for entry in self._entries if entry["tenant"] == tenant]

    def _add(self, entry: dict[str, Any]) -> None:
        self._entries.append(entry)
        self._by_key[(entry["tenant"], entry["key"])] = entry

    def _save(self) -> None:
        if self.path is None:
            return
        # Replaced at once: a provider killed mid-write leaves the previous file, never half of one.
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        partial.write_text(json.dumps({"refunds": self._entries}, indent=1) + "\n")
        partial.replace(self.path)


def _refund_fields(body: Any) -> tuple[str, float]:
    if not isinstance(body, dict) or set(body) != FIELDS:
        raise InvalidRefund('the body must be a JSON object {"order_id": ..., "amount": ...} and nothing else')
    order_id, amount = body["order_id"], body["amount"]
    if not isinstance(order_id, str) or not order_id:
        raise InvalidRefund("order_id must be a non-empty string")
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not amount > 0:
        raise InvalidRefund("amount must be a positive number")
    return order_id, amount


# ---- HTTP --------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: PaymentsServer
    server_version = "corral-demo-payments"

    def do_GET(self) -> None:
        self._answer(lambda tenant: (200, {"refunds": self.server.ledger.refunds(tenant)}, {}))

    def do_POST(self) -> None:
        def create(tenant: str) -> tuple[int, Any, dict[str, str]]:
            refund, replayed = self.server.ledger.refund(tenant, self.headers.get(IDEMPOTENCY_HEADER), self._body())
            return (200, refund, {REPLAYED_HEADER: "true"}) if replayed else (201, refund, {})

        self._answer(create)

    def do_PUT(self) -> None:
        self._refuse(MethodNotAllowed(f"{self.command} is not supported"))

    do_PATCH = do_DELETE = do_PUT

    def _answer(self, handle: Any) -> None:
        try:
            segments = self.path.partition("?")[0].strip("/").split("/")
            if len(segments) != 3 or segments[0] != "v1" or segments[2] != "refunds":
                raise NotFound(f"no such resource: {self.path[:200]}")
            try:
                tenant = validate_tenant_id(segments[1])
            except InvalidIdentifier:
                raise NotFound("no such tenant") from None
            status, body, headers = handle(tenant)
        except PaymentsError as error:
            self._refuse(error)
            return
        self._send(status, body, headers)

    def _body(self) -> Any:
        length = self.headers.get("content-length", "")
        if not length.isdigit():
            raise InvalidRefund("the request needs a Content-Length")
        if int(length) > MAX_BODY_BYTES:
            raise InvalidRefund(f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(self.rfile.read(int(length)))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InvalidRefund("the body is not JSON") from None

    def _refuse(self, error: PaymentsError) -> None:
        log.info("refund_refused", code=error.code, reason=error.message)
        self._send(error.status, error.body(), {})

    def _send(self, status: int, body: Any, headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http_request", line=format % args)


class PaymentsServer(ThreadingHTTPServer):
    """The API on one address (a thread per connection)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], ledger: RefundLedger) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.ledger = ledger
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"


@contextlib.contextmanager
def serve_in_thread(ledger: RefundLedger | None = None, host: str = "127.0.0.1") -> Iterator[PaymentsServer]:
    """The API on a free port of ``host``, served by a thread until the block ends (tests)."""
    server = PaymentsServer((host, 0), ledger or RefundLedger())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def main(argv: list[str] | None = None) -> int:
    """``python -m corral.demo.payments``: serve until SIGTERM or SIGINT, then exit 0."""
    from services.runtime.logging import configure_logging, replica_name

    # Taken by sigwait below, never by a handler (which could interrupt a thread holding a lock);
    # blocked first, so a stop that comes while starting waits, and the serving thread inherits it.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    parser = argparse.ArgumentParser(prog="python -m corral.demo.payments", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--state", type=Path, help="a JSON file that keeps the refunds across restarts")
    args = parser.parse_args(argv)
    logger = configure_logging(
        "payments",
        fmt=os.environ.get("CORRAL_LOG_FORMAT", "auto"),
        level=os.environ.get("CORRAL_LOG_LEVEL", "info"),
        replica=replica_name("payments", os.environ.get("CORRAL_REPLICA"), os.getpid(), socket.gethostname()),
    )
    try:
        server = PaymentsServer((args.host, args.port), RefundLedger(args.state))
    except (OSError, ValueError, KeyError) as error:
        logger.error("payments_failed", reason=str(error))
        return 1
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    logger.info("payments_ready", url=server.url, state=str(args.state) if args.state else None)
    received = signal.sigwait(STOP_SIGNALS)
    server.shutdown()
    thread.join()
    server.server_close()
    logger.info("payments_stopped", signal=signal.Signals(received).name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
