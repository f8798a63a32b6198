"""Conversations in JetStream KV, keyed by tenant: ``SWARM_SESSIONS``, key ``<tenant>.<session>``.

A turn *claims* its session before it runs: a revision-checked write that marks it busy for a
few seconds (``CORRAL_SWARM_CLAIM_S``), renewed while the turn runs. A second turn of the same
session while the first runs gets a typed ``conflict`` at once; a turn whose replica died leaves
a claim that lapses within those seconds, and the next turn goes on from the last turn that
finished. A finished turn writes the session back against
the revision of its claim: a claim that lapsed and was taken by another turn cannot be
overwritten. A failed turn releases its claim and changes nothing (its message is not kept).

Sessions nobody speaks in are forgotten after ``CORRAL_SWARM_SESSION_IDLE_S`` (the bucket's age
limit; every turn rewrites its session). A tenant reaches only its own keys: the service reads a
session only under the tenant of the subject it was asked on, and tenants have no permission on
the bucket.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from pydantic_core import to_json

from contracts.errors import Conflict, NotFound
from services.runtime.settings import jetstream_replicas
from services.swarm.turn import Session

BUCKET = "SWARM_SESSIONS"


class Sessions:
    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s

    async def setup(self, nc: Client) -> None:
        js = nc.jetstream()
        try:
            self.kv = await js.key_value(BUCKET)
        except (BucketNotFoundError, NotFoundError):
            self.kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=BUCKET,
                    history=1,
                    storage=StorageType.FILE,
                    direct=True,
                    ttl=self.idle_s,
                    replicas=jetstream_replicas(),
                )
            )

    async def claim(
        self,
        tenant: str,
        session_id: str,
        turn: str,
        busy_s: float,
        *,
        new: Session,
        principal: str | None,
        fresh: bool = False,
    ) -> tuple[Session, int]:
        """The session (``new`` if it does not exist yet), claimed for ``turn`` for ``busy_s``;
        its revision."""
        key = f"{tenant}.{session_id}"
        until = time.time() + busy_s
        entry = None
        if not fresh:  # an id the service just drew is new: nothing to read
            with contextlib.suppress(KeyNotFoundError):
                entry = await self.kv.get(key)
        if entry is None or not entry.value:
            session = new
            try:
                revision = await self.kv.create(key, _encode(session, turn, until))
            except KeyWrongLastSequenceError:
                raise Conflict(f"session {session_id!r} was started by another turn meanwhile") from None
            return session, revision
        stored = json.loads(entry.value)
        if principal is not None and stored.get("principal") not in (None, principal):
            raise NotFound(f"no session {session_id!r} for this user")  # the same answer as a missing one
        busy = stored.pop("busy", None)
        busy_until = stored.pop("busy_until", 0)
        if busy is not None and busy_until > time.time():
            raise Conflict(f"another turn of session {session_id!r} is in progress; send this one after it")
        session = Session(**stored)
        try:
            revision = await self.kv.update(key, _encode(session, turn, until), last=entry.revision)
        except KeyWrongLastSequenceError:
            raise Conflict(f"another turn of session {session_id!r} is in progress; send this one after it") from None
        return session, revision

    async def renew(
        self, tenant: str, session_id: str, session: Session, turn: str, busy_s: float, revision: int
    ) -> int:
        """Keep the claim of a running turn for ``busy_s`` more (the session as it was before it)."""
        try:
            return await self.kv.update(
                f"{tenant}.{session_id}", _encode(session, turn, time.time() + busy_s), last=revision
            )
        except KeyWrongLastSequenceError:
            raise Conflict(f"session {session_id!r} was taken by another turn while this one ran") from None

    async def save(self, tenant: str, session_id: str, session: Session, revision: int) -> None:
        """Write the session back after its turn (against the revision of the turn's claim)."""
        try:
            await self.kv.update(f"{tenant}.{session_id}", _encode(session), last=revision)
        except KeyWrongLastSequenceError:
            raise Conflict(
                f"session {session_id!r} was taken by another turn while this one ran (it outlived its claim)"
            ) from None

    async def release(self, tenant: str, session_id: str, session: Session, revision: int, created: bool) -> None:
        """A failed turn: the session as it was before it (a new one is removed)."""
        key = f"{tenant}.{session_id}"
        try:
            if created:
                await self.kv.delete(key, last=revision)
            else:
                await self.kv.update(key, _encode(session), last=revision)
        except Exception:  # the claim lapses on its own
            return

    async def get(self, tenant: str, session_id: str) -> dict[str, Any] | None:
        try:
            entry = await self.kv.get(f"{tenant}.{session_id}")
        except KeyNotFoundError:
            return None
        return json.loads(entry.value) if entry.value else None


def _encode(session: Session, turn: str | None = None, until: float | None = None) -> bytes:
    # A shallow copy of the fields: to_json walks the messages itself, and asdict's deep copy of
    # every message was a fifth of the service's time per turn (corral bench swarm, py-spy).
    data: dict[str, Any] = dict(vars(session))
    if turn is not None:
        data["busy"], data["busy_until"] = turn, until
    return to_json(data)
