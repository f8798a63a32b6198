"""Who may see what: the operator's token sees every tenant, a tenant's token only its own.

The operator's credential is ``monitor_operator_token`` in the state directory's secrets (written
by ``corral init``, mode 0600). A tenant's token is verified exactly as the auth service verifies
it for the broker (``services/runtime/tokens.py``: algorithm pinned per key, expiry, issuer,
audience, the tenant claim), with the same keys: a keys file and the identity provider's JWKS
(``services/runtime/jwks.py``, refreshed on an unknown ``kid`` at most once per its interval).

A tenant whose policy is ``principal_scoped`` keeps its users apart: its figures (every user's
traffic) are shown only to a token that carries the monitor's scope (``CORRAL_MONITOR_SCOPE``,
``monitor`` by default); its other users get ``forbidden``, as for another tenant's figures.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

from contracts.errors import Forbidden, Unauthorized
from services.runtime.jwks import JwksKeys, token_kid
from services.runtime.tokens import TokenVerifier


@dataclass(frozen=True)
class Viewer:
    """The caller: the operator (``tenant`` is None) or one tenant; ``needs`` names the scope its
    token lacks to see its own tenant's figures (a principal-scoped tenant's), else None."""

    tenant: str | None
    needs: str | None = None

    @property
    def operator(self) -> bool:
        return self.tenant is None

    def may_see(self, tenant: str) -> bool:
        return self.tenant is None or (self.tenant == tenant and self.needs is None)

    def check(self, tenant: str) -> None:
        """:class:`Forbidden` unless it may see ``tenant`` (the same answer whether it exists or not)."""
        if self.may_see(tenant):
            return
        if self.tenant == tenant:
            raise Forbidden(unscoped(self.needs or ""))
        raise Forbidden("a tenant's token sees only its own tenant's figures")


def unscoped(scope: str) -> str:
    """The refusal of a principal-scoped tenant's user whose token lacks the monitor's scope."""
    return f"this tenant keeps its users apart: its figures need a token with the {scope[:64]!r} scope"


class Access:
    def __init__(
        self,
        operator_token: str | None,
        verifier: TokenVerifier | None,
        jwks: JwksKeys | None = None,
        *,
        principal_scoped: Callable[[str], bool] = lambda tenant: False,
        scope: str = "monitor",
    ) -> None:
        self._operator = operator_token.encode() if operator_token else None
        self._verifier = verifier
        self.jwks = jwks
        self.principal_scoped = principal_scoped
        self.scope = scope

    def needs(self, tenant: str, scopes: frozenset[str]) -> str | None:
        """The scope a user of ``tenant`` holding ``scopes`` lacks to see the tenant's figures."""
        return self.scope if self.principal_scoped(tenant) and self.scope not in scopes else None

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
        return Viewer(identity.tenant, self.needs(identity.tenant, identity.scopes))
