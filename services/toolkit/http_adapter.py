"""HTTP/REST APIs as tools, over one shared httpx client.

The tenant is injected by the runtime: into the configured header and the ``{tenant_id}`` path
parameter. Other ``{name}`` placeholders in the URL are filled (URL-encoded) from the arguments;
the remaining arguments go in the query string (GET, DELETE) or the JSON body. Structured values
(objects, lists of objects) in a path or query are sent as JSON text, never as Python reprs.
Redirects are not followed (they could carry the tenant header to another host) and are failures.
Idempotent calls are tried again on lost connections and 502/503/504 under the runtime's retry
policy (``services/runtime/retry.py``), never past what is left of the caller's deadline.

A call with an idempotency key (``ctx.idempotency_key``) sends it as the ``Idempotency-Key``
header, the runtime's value replacing any configured one. An upstream that honours the header
acts once per key, so with a key POST and PATCH are tried again too; without one they never are
(a lost answer does not say whether the first try acted).

Arguments can never move a call to another resource (``services/toolkit/url_template.py``). The
URL's ``${NAME}`` environment variables are filled in once, when the adapter is built.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from typing import Any

import httpx

from contracts.definitions import HttpTool
from contracts.errors import DeadlineExceeded, InvalidRequest, ToolFailed
from services.runtime.retry import RetryPolicy, call_with_retries
from services.toolkit.context import ToolContext
from services.toolkit.url_template import UrlTemplate, expand_variables

IDEMPOTENT = frozenset({"GET", "PUT", "DELETE"})
IDEMPOTENCY_HEADER = "Idempotency-Key"
# What an HTTP header value may hold (visible ASCII, inner spaces): a key that is not one is refused,
# never sent mangled or split into another header.
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
RETRY_STATUSES = frozenset({502, 503, 504})
# Backoff between tries; the number of tries is each tool's ``retries`` (idempotent methods, or
# any method when the call has an idempotency key).
RETRY = RetryPolicy(initial_interval_s=0.05, multiplier=2.0, max_interval_s=1.0, jitter=0.5)
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
TENANT = "tenant_id"


class UpstreamUnavailable(ToolFailed):
    """The endpoint was unreachable or answered 502/503/504: worth another try when the call is
    idempotent (the wire code stays ``tool_failed``)."""


class HttpAdapter:
    """One HTTP tool: builds each request from the runtime's context and the caller's arguments."""

    def __init__(self, name: str, config: HttpTool, client: httpx.AsyncClient) -> None:
        self.name = name
        self.config = config
        self.client = client
        self.template = UrlTemplate.parse(name, expand_variables(name, config.url))
        self.retry = replace(RETRY, max_attempts=1 + config.retries)
        self.once = replace(RETRY, max_attempts=1)

    def build(self, ctx: ToolContext, arguments: dict[str, Any]) -> tuple[httpx.URL, dict[str, Any], dict[str, str]]:
        """(checked url, arguments for the JSON body, headers) for one call."""
        url, remaining = self.template.fill(
            ctx.tenant_id, arguments, rest_in_query=self.config.method in ("GET", "DELETE")
        )
        headers = dict(self.config.headers)
        if self.config.tenant_header:
            _set_header(headers, self.config.tenant_header, ctx.tenant_id)
        if ctx.run_id:
            headers["X-Corral-Run"] = ctx.run_id
        if ctx.idempotency_key:
            if not _HEADER_VALUE.fullmatch(ctx.idempotency_key):
                raise InvalidRequest(f"tool {self.name!r}: the idempotency key cannot be sent as an HTTP header")
            _set_header(headers, IDEMPOTENCY_HEADER, ctx.idempotency_key)
        return url, remaining, headers

    def retry_policy(self, ctx: ToolContext) -> RetryPolicy:
        """Idempotent methods are tried again; POST and PATCH only under an idempotency key, which
        lets the upstream recognise the second try of a call that did act the first time."""
        return self.retry if self.config.method in IDEMPOTENT or ctx.idempotency_key else self.once

    async def call(self, ctx: ToolContext, arguments: dict[str, Any]) -> Any:
        url, remaining, headers = self.build(ctx, arguments)
        method = self.config.method
        body = {} if method in ("GET", "DELETE") else {"json": remaining}  # GET, DELETE: all in the url
        # The context's time is what is left of the caller's deadline: no try or pause goes past it.
        timeout = min(self.config.timeout_s, ctx.timeout_s)
        deadline = time.monotonic() + timeout

        async def attempt() -> Any:
            left = max(0.0, deadline - time.monotonic())
            try:
                status, content, content_type = await self._send(method, url, headers, body, left)
            except httpx.TimeoutException:
                raise DeadlineExceeded(f"tool {self.name!r} did not answer within {timeout:.1f}s") from None
            except httpx.TransportError as exc:
                raise UpstreamUnavailable(f"tool {self.name!r} is unreachable ({type(exc).__name__})") from None
            if status in RETRY_STATUSES:
                raise UpstreamUnavailable(_status_failure(self.name, status, content))
            return self._result(status, content, content_type)

        return await call_with_retries(
            attempt,
            self.retry_policy(ctx),
            retry_if=lambda error: isinstance(error, UpstreamUnavailable),
            deadline=deadline,
        )

    async def _send(
        self, method: str, url: httpx.URL, headers: dict[str, str], body: dict[str, Any], timeout: float
    ) -> tuple[int, bytes, str]:
        limit = self.config.max_response_bytes
        async with self.client.stream(method, url, headers=headers, timeout=timeout, **body) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:  # refused before reading any of it
                raise ToolFailed(f"tool {self.name!r} answered more than {limit} bytes")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ToolFailed(f"tool {self.name!r} answered more than {limit} bytes")
                chunks.append(chunk)
            return response.status_code, b"".join(chunks), response.headers.get("content-type", "")

    def _result(self, status: int, content: bytes, content_type: str) -> Any:
        if status >= 400:
            raise ToolFailed(_status_failure(self.name, status, content))
        if status >= 300:
            raise ToolFailed(f"tool {self.name!r} answered HTTP {status} (redirects are not followed)")
        text = content.decode(errors="replace")
        if "json" in content_type:
            try:
                return json.loads(text) if text else None
            except json.JSONDecodeError:
                raise ToolFailed(f"tool {self.name!r} answered invalid JSON") from None
        return text


def _set_header(headers: dict[str, str], name: str, value: str) -> None:
    """Set the runtime's header: names are case-insensitive, so a configured variant must not travel alongside."""
    wanted = name.lower()
    for key in [key for key in headers if key.lower() == wanted]:
        del headers[key]
    headers[name] = value


def _status_failure(tool: str, status: int, content: bytes) -> str:
    reason = " ".join(content[:200].decode(errors="replace").split())
    return f"tool {tool!r} answered HTTP {status}" + (f": {reason}" if reason else "")
