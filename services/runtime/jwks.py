"""Identity-provider keys from a JWKS URL: fetched without blocking, cached, refreshed on an
unknown ``kid`` at most once per ``min_refresh_s`` (a flood of random kids cannot hammer the IdP).

In the runtime because two services verify tenants' tokens with them: the auth service (the
broker's callout) and the monitor (a tenant's bearer token); ``services/auth/jwks.py`` re-exports it.

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

from services.runtime.tokens import ASYMMETRIC, TokenVerifier, VerificationKey

log = structlog.get_logger()


def token_kid(token: str) -> str | None:
    """The ``kid`` in a token's header, unverified (None if it has none or is malformed: the
    verifier then reports it)."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        return None
    return kid if isinstance(kid, str) else None


def parse_jwks(document: Any) -> dict[str, VerificationKey]:
    """The usable keys of a JWKS document, by kid (:class:`ValueError` if it is not one).

    A key is usable when it has a ``kid``, pins an asymmetric ``alg`` and, if it says what it is
    for, is a signature key (``use: sig``). PyJWT's :class:`jwt.PyJWKSet` builds the key objects
    (and checks the key type fits the algorithm); the filter comes first because PyJWK would
    otherwise guess an algorithm from the key type (``oct`` -> HS256, ``RSA`` -> RS256).
    """
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    pinned = []
    for entry in entries:
        kid, algorithm = (entry.get("kid"), entry.get("alg")) if isinstance(entry, dict) else (None, None)
        if not isinstance(kid, str) or not kid or algorithm not in ASYMMETRIC:
            log.warning(
                "jwks_key_ignored",
                kid=str(kid)[:64],
                alg=str(algorithm)[:16],
                reason="needs a kid and an asymmetric alg",
            )
            continue
        if entry.get("use", "sig") != "sig":
            log.warning("jwks_key_ignored", kid=kid[:64], reason=f"not a signature key (use={entry.get('use')!r})")
            continue
        pinned.append(entry)
    if not pinned:
        return {}
    try:
        found = jwt.PyJWKSet.from_dict({"keys": pinned})
    except jwt.PyJWTError as error:  # PyJWKSetError: none of them could be built
        log.warning("jwks_keys_unusable", reason=str(error)[:200])
        return {}
    keys = {jwk.key_id: VerificationKey(jwk.key_id, jwk.algorithm_name, jwk.key) for jwk in found.keys if jwk.key_id}
    for entry in pinned:
        if entry["kid"] not in keys:  # PyJWKSet skips a key it cannot build (say an RSA key marked ES256)
            log.warning("jwks_key_ignored", kid=entry["kid"][:64], reason="not a valid key for its alg")
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
        timeout_s: float = 1.5,  # under the broker's 2 s callout timeout: a slow IdP must not time out the connect
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
        """Fetch the JWKS now; on failure (unreachable, slow, not a JWKS) keep the keys already known."""
        self.fetched_at = time.monotonic()
        self.fetches += 1
        try:
            async with asyncio.timeout(self.timeout_s):  # in all: httpx's timeout is per phase
                response = await self.http.get(self.url, timeout=self.timeout_s)
            response.raise_for_status()
            keys = parse_jwks(response.json())
        except (TimeoutError, httpx.HTTPError, httpx.InvalidURL, ValueError) as error:
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
