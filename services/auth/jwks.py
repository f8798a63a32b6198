"""Identity-provider keys from a JWKS URL: fetched without blocking, cached, refreshed on an
unknown ``kid`` at most once per ``min_refresh_s`` (a flood of random kids cannot hammer the IdP).

RFC 8725: each key's algorithm is pinned by its own ``alg``; a JWK without one, or with a
symmetric algorithm, is ignored.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import jwt
import structlog

from services.auth.tokens import ASYMMETRIC, TokenVerifier, VerificationKey

log = structlog.get_logger()


def parse_jwks(document: Any) -> dict[str, VerificationKey]:
    """The usable keys of a JWKS document, by kid."""
    keys: dict[str, VerificationKey] = {}
    entries = document.get("keys") if isinstance(document, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        kid, algorithm = (entry.get("kid"), entry.get("alg")) if isinstance(entry, dict) else (None, None)
        if not kid or algorithm not in ASYMMETRIC:
            log.warning("jwks_key_ignored", kid=kid, alg=algorithm, reason="needs a kid and an asymmetric alg")
            continue
        try:
            keys[kid] = VerificationKey(kid, algorithm, jwt.PyJWK(entry, algorithm=algorithm).key)
        except jwt.PyJWTError as error:
            log.warning("jwks_key_ignored", kid=kid, reason=str(error))
    return keys


class JwksKeys:
    """Keeps a verifier's keys in step with a JWKS URL (plus keys configured from a file)."""

    def __init__(
        self,
        url: str,
        verifier: TokenVerifier,
        *,
        min_refresh_s: float = 30.0,
        http: httpx.AsyncClient | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = url
        self.verifier = verifier
        self.static = dict(verifier.keys)
        self.min_refresh_s = min_refresh_s
        self.timeout_s = timeout_s
        self.http = http or httpx.AsyncClient()
        self.fetched_at: float | None = None
        self.fetches = 0
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Fetch the JWKS now; on failure keep the keys already known."""
        self.fetched_at = time.monotonic()
        self.fetches += 1
        try:
            response = await self.http.get(self.url, timeout=self.timeout_s)
            response.raise_for_status()
            keys = parse_jwks(response.json())
        except (httpx.HTTPError, ValueError) as error:
            log.warning("jwks_fetch_failed", url=self.url, error=f"{type(error).__name__}: {error}")
            return
        self.verifier.keys = {**keys, **self.static}  # keys from the operator's file win
        log.info("jwks_fetched", url=self.url, kids=sorted(keys))

    async def refresh_if_unknown(self, kid: str) -> None:
        """Refresh when ``kid`` is unknown and the last fetch is older than ``min_refresh_s``."""
        if kid in self.verifier.keys:
            return
        async with self._lock:
            if kid in self.verifier.keys:
                return
            if self.fetched_at is not None and time.monotonic() - self.fetched_at < self.min_refresh_s:
                return
            await self.refresh()

    async def aclose(self) -> None:
        await self.http.aclose()
