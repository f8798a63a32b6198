"""Per-tenant fairness at dispatch: no tenant holds more than its share of a replica's slots.

Every message of a core operation is admitted here from the read loop (or the subscription's
callback) with only its subject's tenant token looked at, before anything is decoded:

- a tenant under its in-flight cap starts at once when a slot of the replica is free;
- otherwise the message waits in its tenant's own bounded queue, and freed slots go to the
  waiting tenants in turn (round robin), so a flooding tenant's backlog never stands in front of
  another tenant's message;
- past its queue (or the replica's total of queued messages) the message is refused at once.

Nothing waits in nats-py's single per-subscription FIFO any more, which is what let one tenant's
flood hold every other tenant's requests behind it. No NATS here: the service passes in what to
start (services/runtime/service.py).
"""

from __future__ import annotations

import collections
import enum
from typing import Generic, TypeVar

from services.runtime.slots import Slots

T = TypeVar("T")


class Admission(enum.Enum):
    START = "start"  # a slot is taken: start it now
    QUEUED = "queued"  # waits for its tenant's turn
    FULL = "full"  # refuse it: its tenant's queue (or the replica's) is full


class _Tenant(Generic[T]):
    __slots__ = ("in_flight", "queue", "ready")

    def __init__(self) -> None:
        self.in_flight = 0
        self.queue: collections.deque[T] = collections.deque()
        self.ready = False  # in the round of tenants waiting for a slot


class FairShare(Generic[T]):
    """Admission of items (messages) per tenant into ``slots``, the replica's in-flight limit."""

    def __init__(self, slots: Slots, *, per_tenant: int, queue_per_tenant: int, queue_total: int) -> None:
        self.slots = slots
        self.per_tenant = per_tenant
        self.queue_per_tenant = queue_per_tenant
        self.queue_total = queue_total
        self.queued = 0
        self._tenants: dict[str, _Tenant[T]] = {}
        # Tenants with queued items and under their cap, in the order they get the next slots.
        self._round: collections.deque[str] = collections.deque()

    def admit(self, tenant: str, item: T) -> Admission:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant()
        if state.in_flight < self.per_tenant and not state.queue and self.slots.try_take():
            state.in_flight += 1
            return Admission.START
        if len(state.queue) >= self.queue_per_tenant or self.queued >= self.queue_total:
            if not state.in_flight and not state.queue:
                del self._tenants[tenant]
            return Admission.FULL
        state.queue.append(item)
        self.queued += 1
        if state.in_flight < self.per_tenant:
            self._enter_round(tenant, state)
        return Admission.QUEUED

    def release(self, tenant: str | None) -> tuple[str, T] | None:
        """An item of ``tenant`` (None: work not admitted here) finished and gave its slot back:
        the next waiting item takes the slot (returned, to be started), else the slot is free."""
        if tenant is not None:
            state = self._tenants[tenant]
            state.in_flight -= 1
            if state.queue and state.in_flight < self.per_tenant:
                self._enter_round(tenant, state)
            elif not state.in_flight and not state.queue:
                del self._tenants[tenant]
        while self._round:
            name = self._round.popleft()
            state = self._tenants[name]
            state.ready = False
            if not state.queue or state.in_flight >= self.per_tenant:
                continue  # stale: it was served or reached its cap since it joined the round
            item = state.queue.popleft()
            self.queued -= 1
            state.in_flight += 1
            if state.queue and state.in_flight < self.per_tenant:
                self._enter_round(name, state)
            return name, item  # the slot passes straight to it
        self.slots.give()
        return None

    def drain(self) -> list[tuple[str, T]]:
        """Every queued item, removed (a stopping replica answers them)."""
        items = [(name, item) for name, state in self._tenants.items() for item in state.queue]
        for state in self._tenants.values():
            state.queue.clear()
            state.ready = False
        self._round.clear()
        self.queued = 0
        return items

    def in_flight(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return 0 if state is None else state.in_flight

    def waiting(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return 0 if state is None else len(state.queue)

    def _enter_round(self, name: str, state: _Tenant[T]) -> None:
        if not state.ready:
            state.ready = True
            self._round.append(name)
