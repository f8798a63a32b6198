"""The event-loop choice and the service's in-flight slots."""

from __future__ import annotations

import asyncio

import pytest

from services.runtime import loop as event_loop
from services.runtime.slots import Slots


@pytest.mark.parametrize(("setting", "expected"), [("", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_the_loop_is_uvloop_unless_asked_otherwise(monkeypatch, setting, expected):
    monkeypatch.setenv("CORRAL_EVENT_LOOP", setting)
    assert event_loop.loop_name() == expected


def test_an_unknown_loop_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CORRAL_EVENT_LOOP", "trio")
    with pytest.raises(SystemExit, match="CORRAL_EVENT_LOOP must be one of"):
        event_loop.loop_name()


@pytest.mark.parametrize("setting", ["uvloop", "asyncio"])
def test_run_runs_the_coroutine_on_the_chosen_loop(monkeypatch, setting):
    monkeypatch.setenv("CORRAL_EVENT_LOOP", setting)

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert event_loop.run(which()).startswith(setting)


async def test_slots_are_taken_without_waiting_until_none_is_free():
    slots = Slots(2)
    assert slots.try_take() and slots.try_take()
    assert not slots.try_take()
    slots.give()
    assert slots.try_take()


async def test_a_given_slot_goes_to_the_longest_waiter_and_not_to_a_newcomer():
    slots = Slots(1)
    assert slots.try_take()
    order = []

    async def wait(name):
        await slots.take()
        order.append(name)

    first = asyncio.create_task(wait("first"))
    second = asyncio.create_task(wait("second"))
    await asyncio.sleep(0)  # a yield: both are now waiting
    slots.give()
    assert not slots.try_take()  # the slot went to the first waiter, not to the read loop
    await first
    assert order == ["first"]
    slots.give()
    await second
    assert order == ["first", "second"]


async def test_a_cancelled_waiter_leaves_no_slot_behind():
    slots = Slots(1)
    assert slots.try_take()
    waiter = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    slots.give()
    assert slots.try_take()  # the slot came back: no dead waiter holds it
    assert not slots.try_take()


async def test_a_waiter_cancelled_as_it_is_handed_a_slot_passes_it_on():
    slots = Slots(1)
    assert slots.try_take()
    waiter = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.give()  # handed to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.try_take()


def test_settle_gc_freezes_what_is_alive_and_collects_less_often() -> None:
    import gc

    before = gc.get_threshold()
    kept = [object() for _ in range(10)]
    try:
        event_loop.settle_gc()
        assert gc.get_threshold() == event_loop.GC_THRESHOLDS
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
