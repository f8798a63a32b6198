"""The Python client side of Corral: connect as a tenant, send requests, watch their events.

A tenant connection uses its application JWT as the connect token (the broker's auth callout
turns it into tenant-scoped permissions) and the tenant's inbox prefix, without which replies
could not reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, ConnectionReconnectingError, NoRespondersError, StaleConnectionError
from nats.errors import TimeoutError as NatsTimeout

from contracts import subjects
from contracts.envelope import AnyEnvelope, EventType, Kind, RouterRequest, RunEvent, deadline_in, envelope_of, new_id
from contracts.errors import DeadlineExceeded, Internal
from services.runtime.service import decode_reply

OnEvent = Callable[[RunEvent], Awaitable[None] | None]
TERMINAL = (EventType.COMPLETED, EventType.FAILED)
NOT_CONNECTED = "not connected to Corral (was the token refused or has it expired?)"


@dataclass
class RunResult:
    run_id: str
    output: Any
    events: list[RunEvent] = field(default_factory=list)


class CorralClient:
    """One tenant's connection to Corral.

    The server closes a tenant's connection when its token expires. With a token *provider*
    (a callable returning a fresh token) the client then opens a new connection with a new token
    by itself; ``renewed`` is set each time it did. With a fixed token it stays closed.
    """

    def __init__(self, url: str, tenant: str, token: str | Callable[[], str], options: dict[str, Any]) -> None:
        self.url = url
        self.tenant = tenant
        self.token = token
        self.options = options
        self.errors: list[Exception] = []
        self.renewed = asyncio.Event()
        self.nc: Client = Client()
        self._closing = False

    @classmethod
    async def connect(cls, url: str, *, tenant: str, token: str | Callable[[], str], **options: Any) -> CorralClient:
        """Connect as ``tenant`` with a token or a token provider (extra options go to nats-py)."""
        client = cls(url, tenant, token, options)
        client.nc = await client._open()
        return client

    async def _open(self) -> Client:
        async def on_error(error: Exception) -> None:
            self.errors.append(error)

        return await nats.connect(
            self.url,
            token=self.token,  # nats-py calls a callable token on every CONNECT
            inbox_prefix=subjects.inbox_prefix(self.tenant).encode(),
            error_cb=on_error,
            closed_cb=self._on_closed,
            name=f"corral-client-{self.tenant}",
            **self.options,
        )

    async def _on_closed(self) -> None:
        if self._closing or not callable(self.token):
            return
        try:
            self.nc = await self._open()
        except Exception as error:  # the provider's token was refused too: stay closed
            self.errors.append(error)
            return
        self.renewed.set()

    async def close(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            await self.nc.drain()

    async def request(
        self,
        text: str | None = None,
        *,
        target: str | None = None,
        input: dict[str, Any] | None = None,
        timeout: float = 30.0,
        on_event: OnEvent | None = None,
        watch: bool = True,
    ) -> RunResult:
        """Send one request to the router and return its result; raises the typed error it ends in.

        With ``watch`` the run's events are collected (and passed to ``on_event``) until its
        terminal event, which may arrive just after the reply since it comes from another service.
        """
        run_id = new_id()
        text_input = {"text": text} if text is not None else {}
        payload = RouterRequest(target=target, input={**(input or {}), **text_input}, stream=watch)
        envelope = envelope_of(RouterRequest)(
            kind=Kind.REQUEST, tenant_id=self.tenant, run_id=run_id, deadline=deadline_in(timeout), payload=payload
        )
        events: list[RunEvent] = []
        finished = asyncio.Event()
        subscription = None
        if watch:

            async def on_message(msg: Msg) -> None:
                event = RunEvent.model_validate(AnyEnvelope.model_validate_json(msg.data).payload)
                events.append(event)
                if on_event is not None:
                    result = on_event(event)
                    if asyncio.iscoroutine(result):
                        await result
                if event.type in TERMINAL:
                    finished.set()

            try:
                subscription = await self.nc.subscribe(subjects.events(self.tenant, run_id), cb=on_message)
            except (ConnectionClosedError, ConnectionReconnectingError, StaleConnectionError):
                raise Internal(NOT_CONNECTED) from None
        try:
            try:
                msg = await self.nc.request(
                    subjects.router_request(self.tenant), envelope.model_dump_json().encode(), timeout=timeout
                )
            except NatsTimeout:
                raise DeadlineExceeded(f"no answer within {timeout:.1f}s") from None
            except NoRespondersError:
                raise Internal("no router is running") from None
            except (ConnectionClosedError, ConnectionReconnectingError, StaleConnectionError):
                raise Internal(NOT_CONNECTED) from None
            try:
                output = decode_reply(msg.data)
            finally:
                if subscription is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(finished.wait(), timeout=1.0)
            return RunResult(run_id=run_id, output=output, events=events)
        finally:
            if subscription is not None:
                await subscription.unsubscribe()
