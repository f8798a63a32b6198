"""Tenant tokens already verified, remembered until they expire: a reconnect costs no signature check.

The auth callout verifies a tenant's token on every connect. The same token comes back each time
its client reconnects (a network blip, a broker restart: every client at once), so the identity
a token was verified to carry is kept, bounded, until the token's own ``exp``. What it promises
(docs/security.md, "The token cache"):

- **Only verified tokens.** An entry is written after :meth:`TokenVerifier.verify` returned an
  identity, never for a token it refused; a refused token is verified again (and refused again)
  each time it is presented.
- **Never past its expiry.** A hit is checked against the token's ``exp`` on every use, with no
  leeway: from that second on the token is verified again, so the verifier (and its clock leeway)
  decides as if there were no cache.
- **Never under a key that is gone.** Each entry holds the very key object it was verified with
  (the ``kid``'s, or the development key). A hit counts only while the verifier still holds that
  same object for that ``kid``. A JWKS refresh replaces the verifier's keys with new objects
  (``services/runtime/jwks.py``), so every token verified under a JWKS key is verified once more
  against the keys of now, and refused if its key was removed or replaced. (So a refresh, at most
  one per ``CORRAL_AUTH_JWKS_MIN_REFRESH_S`` even when unknown kids force it, costs each such
  token one signature check.) Keys from a file change only with a restart, which starts with an
  empty cache.
- **Bounded.** At most ``max_entries`` (100,000 by default), least recently used dropped first;
  an entry is the SHA-256 of the token (the cache never holds a bearer token), the identity's
  fields and a reference to its key: about 0.5 KB (50 MB when full). A flood of valid tokens can
  only push others out, which costs them one signature check each.
- **Policy is not cached.** Only the token's verification is: the tenant's connection limit, its
  policy and the permissions of the user JWT are decided on every connect as before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from services.auth.settings import TOKEN_CACHE_ENTRIES
from services.runtime.tokens import Identity, TokenVerifier

NO_SCOPES: frozenset[str] = frozenset()
# An entry: the identity's tenant, subject, expiry and scopes, the token's kid and the key object
# it was verified with. A tuple, not the Identity itself: half the memory (an Identity is rebuilt
# on a hit, in well under a microsecond).
Entry = tuple[str, str, int, frozenset[str], str | None, Any]


class VerifiedTokens:
    """A bounded LRU of verified tokens in front of a :class:`TokenVerifier`."""

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        max_entries: int = TOKEN_CACHE_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.verifier = verifier
        self.max_entries = max(0, max_entries)
        self.clock = clock
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()  # by the token's SHA-256
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def remembered(self, token: str) -> Identity | None:
        """The identity of ``token`` if it was verified before, is not expired and its key is
        still the verifier's; else None (the caller verifies it: :meth:`verify`)."""
        digest = _digest(token)
        found = self._entries.get(digest)
        if found is None:
            self.misses += 1
            return None
        tenant, subject, expires_at, scopes, kid, key = found
        if self.clock() >= expires_at or self._key_of(kid) is not key:
            del self._entries[digest]
            self.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.hits += 1
        return Identity(tenant=tenant, subject=subject, expires_at=expires_at, scopes=scopes)

    def verify(self, token: str) -> Identity:
        """Verify ``token`` (:class:`InvalidToken` as the verifier raises it) and remember it."""
        identity = self.verifier.verify(token)
        # Read after it verified, with no await in between: the very key the verifier used. The
        # header it read is well-formed, so this reading of its kid is the verifier's.
        kid = header_kid(token)
        key = self._key_of(kid)
        if self.max_entries and self.clock() < identity.expires_at:
            entries = self._entries
            scopes = identity.scopes or NO_SCOPES
            # The tenant interned: a tenant's many tokens then share one string.
            entries[_digest(token)] = (
                sys.intern(identity.tenant),
                identity.subject,
                identity.expires_at,
                scopes,
                kid,
                key,
            )
            while len(entries) > self.max_entries:
                entries.popitem(last=False)
        return identity

    def identity(self, token: str) -> Identity:
        """The identity of ``token``: remembered, else verified (and remembered)."""
        return self.remembered(token) or self.verify(token)

    def _key_of(self, kid: str | None) -> Any:
        return self.verifier.dev_key if kid is None else self.verifier.keys.get(kid)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def header_kid(token: str) -> str | None:
    """The ``kid`` of a token's header, read without checking anything else (None if there is
    none, or the header cannot be read). PyJWT 2.15 reads a header with a per-character check of
    every segment, about 15 µs each time: the callout reads it once, inside the verifier."""
    try:
        header = token.split(".", 1)[0]
        kid = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))).get("kid")
    except (ValueError, AttributeError, binascii.Error):
        return None
    return kid if isinstance(kid, str) else None
