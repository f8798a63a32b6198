"""HTTP/REST APIs as tools, over one shared httpx client.

The tenant is injected by the runtime: into the configured header and the ``{tenant_id}`` path
parameter. Other ``{name}`` placeholders in the URL are filled (URL-encoded) from the arguments;
the remaining arguments go in the query string (GET, DELETE) or the JSON body. Structured values
(objects, lists of objects) in a path or query are sent as JSON text, never as Python reprs.
Redirects are not followed (they could carry the tenant header to another host) and are failures.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import quote

import httpx

from contracts.definitions import HttpTool
from contracts.errors import DeadlineExceeded, InvalidRequest, ToolFailed
from services.tools.context import ToolContext

IDEMPOTENT = frozenset({"GET", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({502, 503, 504})
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class HttpAdapter:
    """One HTTP tool: builds each request from the runtime's context and the caller's arguments."""

    def __init__(self, name: str, config: HttpTool, client: httpx.AsyncClient) -> None:
        self.name = name
        self.config = config
        self.client = client

    def build(self, ctx: ToolContext, arguments: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, str]]:
        """(url, remaining arguments, headers) for one call."""
        remaining = dict(arguments)

        def fill(match: re.Match[str]) -> str:
            key = match.group(1)
            if key == "tenant_id":
                return quote(ctx.tenant_id, safe="")
            if key not in remaining:
                raise InvalidRequest(f"tool {self.name!r} needs the argument {key!r}")
            return quote(as_text(remaining.pop(key)), safe="")

        url = _PLACEHOLDER.sub(fill, self.config.url)
        headers = dict(self.config.headers)
        if self.config.tenant_header:
            # Header names are case-insensitive: a configured variant must not travel alongside.
            wanted = self.config.tenant_header.lower()
            headers = {key: value for key, value in headers.items() if key.lower() != wanted}
            headers[self.config.tenant_header] = ctx.tenant_id
        if ctx.run_id:
            headers["X-Corral-Run"] = ctx.run_id
        return url, remaining, headers

    async def call(self, ctx: ToolContext, arguments: dict[str, Any]) -> Any:
        url, remaining, headers = self.build(ctx, arguments)
        method = self.config.method
        body = {"params": query_params(remaining)} if method in ("GET", "DELETE") else {"json": remaining}
        timeout = min(self.config.timeout_s, ctx.timeout_s)
        attempts = 1 + (self.config.retries if method in IDEMPOTENT else 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in range(attempts):
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                status, content, content_type = await self._send(method, url, headers, body, left)
            except httpx.TimeoutException:
                raise DeadlineExceeded(f"tool {self.name!r} did not answer within {timeout:.1f}s") from None
            except httpx.TransportError as exc:
                if attempt + 1 < attempts:
                    await asyncio.sleep(min(0.05 * 2**attempt, max(0.0, deadline - loop.time())))
                    continue
                raise ToolFailed(f"tool {self.name!r} is unreachable ({type(exc).__name__})") from None
            if status in RETRY_STATUSES and attempt + 1 < attempts:
                await asyncio.sleep(min(0.05 * 2**attempt, max(0.0, deadline - loop.time())))
                continue
            return self._result(status, content, content_type)
        raise DeadlineExceeded(f"tool {self.name!r} did not answer within {timeout:.1f}s")

    async def _send(
        self, method: str, url: str, headers: dict[str, str], body: dict[str, Any], timeout: float
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
            reason = " ".join(content[:200].decode(errors="replace").split())
            raise ToolFailed(f"tool {self.name!r} answered HTTP {status}" + (f": {reason}" if reason else ""))
        if status >= 300:
            raise ToolFailed(f"tool {self.name!r} answered HTTP {status} (redirects are not followed)")
        text = content.decode(errors="replace")
        if "json" in content_type:
            try:
                return json.loads(text) if text else None
            except json.JSONDecodeError:
                raise ToolFailed(f"tool {self.name!r} answered invalid JSON") from None
        return text


def as_text(value: Any) -> str:
    """A scalar as it reads in a URL (``true``, ``3``, ``abc``); anything structured as JSON."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def query_params(arguments: dict[str, Any]) -> dict[str, str | list[str]]:
    """Arguments as query parameters; a list of scalars repeats the parameter (``?tag=a&tag=b``)
    and a null is left out (an optional argument not given)."""
    params: dict[str, str | list[str]] = {}
    for key, value in arguments.items():
        if value is None:
            continue
        if isinstance(value, list) and all(not isinstance(item, dict | list) for item in value):
            params[key] = [as_text(item) for item in value]
        else:
            params[key] = as_text(value)
    return params
