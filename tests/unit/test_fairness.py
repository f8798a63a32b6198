"""Per-tenant admission into a replica's slots: caps, bounded queues, turns (services/runtime/fairness.py)."""

from __future__ import annotations

from services.runtime.fairness import Admission, FairShare
from services.runtime.slots import Slots


def fair(slots=4, per_tenant=2, queue_per_tenant=3, queue_total=100) -> FairShare[str]:
    return FairShare(Slots(slots), per_tenant=per_tenant, queue_per_tenant=queue_per_tenant, queue_total=queue_total)


def test_a_tenant_under_its_cap_starts_at_once():
    share = fair()
    assert share.admit("acme", "a1") is Admission.START
    assert share.admit("acme", "a2") is Admission.START
    assert share.in_flight("acme") == 2


def test_past_its_cap_a_tenant_waits_in_its_own_queue_and_another_tenant_still_starts():
    share = fair(slots=10, per_tenant=2)
    for n in range(2):
        assert share.admit("acme", f"a{n}") is Admission.START
    assert share.admit("acme", "a2") is Admission.QUEUED
    assert share.admit("globex", "g0") is Admission.START  # acme's backlog is not in its way
    assert share.waiting("acme") == 1


def test_past_its_queue_a_tenant_is_refused_and_others_are_not():
    share = fair(slots=10, per_tenant=1, queue_per_tenant=2)
    assert share.admit("acme", "a0") is Admission.START
    assert [share.admit("acme", f"a{n}") for n in (1, 2, 3)] == [Admission.QUEUED, Admission.QUEUED, Admission.FULL]
    assert share.admit("globex", "g0") is Admission.START


def test_the_replicas_total_queue_is_bounded_too():
    share = fair(slots=1, per_tenant=1, queue_per_tenant=10, queue_total=2)
    assert share.admit("acme", "a0") is Admission.START
    assert share.admit("globex", "g0") is Admission.QUEUED
    assert share.admit("initech", "i0") is Admission.QUEUED
    assert share.admit("umbrella", "u0") is Admission.FULL


def test_freed_slots_go_to_the_waiting_tenants_in_turn():
    share = fair(slots=1, per_tenant=5, queue_per_tenant=10)
    assert share.admit("acme", "a0") is Admission.START
    for n in range(1, 4):
        share.admit("acme", f"a{n}")  # acme's backlog first
    share.admit("globex", "g0")
    share.admit("initech", "i0")
    order = []
    tenant = "acme"
    for _ in range(5):
        following = share.release(tenant)
        assert following is not None
        tenant, item = following
        order.append(item)
    assert order == ["a1", "g0", "i0", "a2", "a3"]  # one each, not acme's whole backlog first
    assert share.release(tenant) is None  # nothing waits: the slot is free again
    assert share.slots.try_take()


def test_a_tenant_at_its_cap_gets_its_next_turn_when_one_of_its_own_finishes():
    share = fair(slots=10, per_tenant=1, queue_per_tenant=5)
    share.admit("acme", "a0")
    share.admit("acme", "a1")
    assert share.release("acme") == ("acme", "a1")


def test_finished_work_outside_fairness_hands_its_slot_to_a_waiting_tenant():
    slots = Slots(1)
    share: FairShare[str] = FairShare(slots, per_tenant=5, queue_per_tenant=5, queue_total=5)
    assert slots.try_take()  # held by, say, a durable consumer's message
    assert share.admit("acme", "a0") is Admission.QUEUED
    assert share.release(None) == ("acme", "a0")


def test_idle_tenants_are_forgotten():
    share = fair()
    share.admit("acme", "a0")
    share.release("acme")
    assert share._tenants == {}
    assert share.admit("globex", "x") is Admission.START and "acme" not in share._tenants


def test_draining_returns_every_queued_item_once():
    share = fair(slots=1, per_tenant=1)
    share.admit("acme", "a0")
    share.admit("acme", "a1")
    share.admit("globex", "g0")
    assert sorted(share.drain()) == [("acme", "a1"), ("globex", "g0")]
    assert share.queued == 0 and share.drain() == []
