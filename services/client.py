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
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from contracts import subjects
from contracts.envelope import AnyEnvelope, EventType, Kind, RouterRequest, RunEvent, deadline_in, envelope_of, new_id
from contracts.errors import DeadlineExceeded, Internal
from services.runtime.service import decode_reply

OnEvent = Callable[[RunEvent], Awaitable[None] | None]
TERMINAL = (EventType.COMPLETED, EventType.FAILED)


@dataclass
class RunResult:
    run_id: str
    output: Any
    events: list[RunEvent] = field(default_factory=list)


class CorralClient:
    """One tenant's connection to Corral."""

    def __init__(self, nc: Client, tenant: str) -> None:
        self.nc = nc
        self.tenant = tenant
        self.errors: list[Exception] = []

    @classmethod
    async def connect(cls, url: str, *, tenant: str, token: str, **options: Any) -> CorralClient:
        client = cls.__new__(cls)
        client.tenant = tenant
        client.errors = []

        async def on_error(error: Exception) -> None:
            client.errors.append(error)

        client.nc = await nats.connect(
            url,
            token=token,
            inbox_prefix=subjects.inbox_prefix(tenant).encode(),
            error_cb=on_error,
            name=f"corral-client-{tenant}",
            **options,
        )
        return client

    async def close(self) -> None:
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

            subscription = await self.nc.subscribe(subjects.events(self.tenant, run_id), cb=on_message)
        try:
            try:
                msg = await self.nc.request(
                    subjects.router_request(self.tenant), envelope.model_dump_json().encode(), timeout=timeout
                )
            except NatsTimeout:
                raise DeadlineExceeded(f"no answer within {timeout:.1f}s") from None
            except NoRespondersError:
                raise Internal("no router is running") from None
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
