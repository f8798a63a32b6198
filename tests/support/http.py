"""A real HTTP server on a free loopback port, scripted per test, recording what it received."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # bytes, str, or JSON-able
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    wait: threading.Event | None = None  # block until set (a stuck upstream)


@dataclass
class ScriptedServer:
    url: str
    received: list[Received]
    replies: list[Reply]
    release: threading.Event


class _QuietServer(ThreadingHTTPServer):
    """A client that went away before its answer (a test's timeout, on purpose) is no error: the
    default handler prints a traceback from its thread, into whichever test runs at that moment."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def http_server(route: Callable[[Received], Reply] | None = None) -> Iterator[ScriptedServer]:
    """Serve on 127.0.0.1; each request is answered by ``route`` or the next queued reply."""
    received: list[Received] = []
    replies: list[Reply] = []
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            request = Received(
                self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length)
            )
            received.append(request)
            reply = route(request) if route else (replies.pop(0) if replies else Reply(body={"ok": True}))
            if reply.wait is not None:
                reply.wait.wait(timeout=30)
            body = reply.body
            if not isinstance(body, bytes):
                body = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(reply.status)
            self.send_header("content-type", reply.content_type)
            self.send_header("content-length", str(len(body)))
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        def log_message(self, *args: Any) -> None:
            pass

    server = _QuietServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield ScriptedServer(f"http://127.0.0.1:{server.server_address[1]}", received, replies, release)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
