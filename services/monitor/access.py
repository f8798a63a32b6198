"""Who may see what: the operator's token sees every tenant, a tenant's token only its own.

The operator's credential is ``monitor_operator_token`` in the state directory's secrets (written
by ``corral init``, mode 0600). A tenant's token is verified exactly as the auth service verifies
it for the broker (``services/runtime/tokens.py``: algorithm pinned per key, expiry, issuer,
audience, the tenant claim), with the same keys: a keys file and the identity provider's JWKS
(``services/runtime/jwks.py``, refreshed on an unknown ``kid`` at most once per its interval).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from contracts.errors import Forbidden, Unauthorized
from services.runtime.jwks import JwksKeys, token_kid
from services.runtime.tokens import TokenVerifier


@dataclass(frozen=True)
class Viewer:
    """The caller: the operator (``tenant`` is None) or one tenant."""

    tenant: str | None

    @property
    def operator(self) -> bool:
        return self.tenant is None

    def may_see(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant

    def check(self, tenant: str) -> None:
        """:class:`Forbidden` unless it may see ``tenant`` (the same answer whether it exists or not)."""
        if not self.may_see(tenant):
            raise Forbidden("a tenant's token sees only its own tenant's figures")


class Access:
    def __init__(
        self, operator_token: str | None, verifier: TokenVerifier | None, jwks: JwksKeys | None = None
    ) -> None:
        self._operator = operator_token.encode() if operator_token else None
        self._verifier = verifier
        self.jwks = jwks

    async def viewer_of(self, authorization: str | None) -> Viewer:
        """:meth:`viewer`, after fetching the JWKS again if the token names a key not known yet."""
        if self.jwks is not None and self._verifier is not None:
            kid = token_kid((authorization or "").partition(" ")[2].strip())
            if kid is not None:
                await self.jwks.refresh_if_unknown(kid)
        return self.viewer(authorization)

    def viewer(self, authorization: str | None) -> Viewer:
        """The viewer a ``Authorization: Bearer <token>`` header names; :class:`Unauthorized` else."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("send Authorization: Bearer <the operator's or a tenant's token>")
        if self._operator is not None and hmac.compare_digest(token.encode(), self._operator):
            return Viewer(None)
        if self._verifier is None:
            raise Unauthorized("not the operator's token (tenant tokens are not configured)")
        try:
            identity = self._verifier.verify(token)
        except Unauthorized:
            raise Unauthorized("not the operator's token nor a valid tenant token") from None
        return Viewer(identity.tenant)
