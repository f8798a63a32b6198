"""The auth service's bus layer: answer every authorization request, never crash on one."""

from __future__ import annotations

from collections.abc import Mapping

from nats.aio.msg import Msg

from contracts import subjects
from contracts.definitions import ConnectionLimits, TenantPolicy
from contracts.errors import CorralError, ErrorCode
from services.auth.broker_connections import BrokerConnections
from services.auth.callout import CalloutSigner, decode_request
from services.auth.denials import DenialAudit
from services.auth.errors import Denied
from services.auth.jwks import JwksKeys
from services.auth.settings import TOKEN_CACHE_ENTRIES
from services.auth.token_cache import VerifiedTokens, header_kid
from services.auth.tokens import TokenVerifier
from services.runtime.service import Service


def register(
    service: Service,
    verifier: TokenVerifier,
    signer: CalloutSigner,
    jwks: JwksKeys | None = None,
    denials: DenialAudit | None = None,
    policies: Mapping[str, TenantPolicy] | None = None,
    connections: BrokerConnections | None = None,
    subscriptions_check_s: float = 0.0,
    cached_tokens: int = TOKEN_CACHE_ENTRIES,
) -> None:
    """Bind the callout responder on ``service``; ``policies``: each tenant's, for its broker
    limits and whether its users are scoped to their own principal (the defaults without one);
    ``connections``: the tenants' open connections, to admit each within its tenant's limit and,
    every ``subscriptions_check_s`` (0: never), to close those past its subscription limit;
    ``cached_tokens``: how many verified tokens are remembered until they expire (0: none,
    services/auth/token_cache.py)."""
    policies = policies or {}
    tokens = VerifiedTokens(verifier, max_entries=cached_tokens)
    defaults = ConnectionLimits()
    if jwks is not None:
        service.on_start(jwks.refresh)
        service.on_stop(jwks.aclose)
    if denials is not None:

        async def start_denials() -> None:
            await denials.start()
            # The callout's own account has no pings or statistics: they are answered from APP.
            await denials.nc.subscribe(subjects.stats(service.name), cb=service.answer_stats)
            await denials.nc.subscribe(subjects.ping(service.name), cb=answer_ping)

        async def answer_ping(msg: Msg) -> None:
            if service.nc.is_connected:  # a probe asks about the callout's own connection
                await service.answer_ping(msg)

        service.on_start(start_denials)
        service.on_stop(denials.stop)
    if connections is not None:
        # Counted before the callout is served: a restarted replica refuses from its first answer.
        service.on_start(connections.start)
        service.on_stop(connections.stop)
        if subscriptions_check_s > 0:

            def subscription_limit(tenant: str) -> int:
                policy = policies.get(tenant)
                return (policy.connection if policy else defaults).max_subscriptions

            def lowest() -> int:  # the policies follow the tenant registry: computed for each sweep
                return min([defaults.max_subscriptions, *(p.connection.max_subscriptions for p in policies.values())])

            async def start_sweeping() -> None:
                connections.sweep_every(subscriptions_check_s, subscription_limit, lowest)

            service.on_start(start_sweeping)

    @service.handler("callout")
    async def authorize(msg: Msg) -> tuple[str | None, str | None] | None:
        """Answer one authorization request; returns the (tenant, error code) it is counted for:
        the verified token's tenant, or for a refusal the tenant a trusted key signed for (else
        none: an unverified tenant claim is the caller's choice)."""
        if not msg.reply:
            return None
        try:
            request = decode_request(msg.data)
        except CorralError as error:
            # Without a verified request there is nobody to address a response to.
            service.log.warning("auth_request_refused", reason=error.message)
            return None, error.code.value
        try:
            identity = tokens.remembered(request.token)
            if identity is None:
                if jwks is not None:
                    kid = header_kid(request.token)  # which key to fetch; the verifier checks the header
                    if kid is not None:
                        await jwks.refresh_if_unknown(kid)
                identity = tokens.verify(request.token)
            policy = policies.get(identity.tenant)
            limits = policy.connection if policy else defaults
            if connections is not None:
                connections.admit(
                    identity.tenant, request.server_id, request.client_id, limits.max_connections, request.server_name
                )
        except CorralError as error:
            client = request.client_name[:64]
            tenant = error.tenant if isinstance(error, Denied) else None
            # Answer first: the server holds the client until it hears back.
            await service.nc.publish(msg.reply, signer.response(request, error=error.message))
            service.log.warning("auth_denied", reason=error.message, client=client, tenant_id=tenant)
            if denials is not None and isinstance(error, Denied):
                denials.record(error, client)
            return tenant, error.code.value
        except Exception:
            service.log.exception("auth_failed")
            await service.nc.publish(msg.reply, signer.response(request, error="internal error"))
            return None, ErrorCode.INTERNAL.value
        service.log.debug("auth_granted", tenant_id=identity.tenant, principal=identity.subject)
        response = signer.response(
            request, identity=identity, limits=limits, principal_scoped=policy.principal_scoped if policy else False
        )
        await service.nc.publish(msg.reply, response)
        return identity.tenant, None
