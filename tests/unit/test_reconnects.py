"""Reconnect waits are short, grow per failure, are jittered, and go to the least-tried server."""

from __future__ import annotations

from types import SimpleNamespace

from services.runtime.connection import quick_reconnects


def servers(*reconnects: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(name=f"s{n}", reconnects=count) for n, count in enumerate(reconnects)]


def test_a_service_tries_again_at_once_then_waits_longer_after_each_failure_up_to_a_cap():
    choose = quick_reconnects(first_s=0.0, most_s=1.0)
    assert choose(servers(0), {})[1] == 0.0
    waits = [choose(servers(n), {})[1] for n in range(1, 8)]
    for n, wait in enumerate(waits, 1):
        base = min(1.0, 0.05 * 2**n)
        assert base * 0.5 <= wait <= base * 1.5
    assert max(waits) <= 1.5  # capped (with its jitter)


def test_a_tenant_waits_a_little_first_so_the_auth_service_is_back_before_it():
    choose = quick_reconnects(first_s=0.25)
    first = [choose(servers(0), {})[1] for _ in range(200)]
    assert min(first) >= 0.125 and max(first) <= 0.375
    assert len({round(w, 6) for w in first}) > 100  # jittered: clients that left together spread out


def test_the_next_attempt_goes_to_the_server_tried_least():
    pool = servers(3, 0, 5)
    assert quick_reconnects(first_s=0.0)(pool, {})[0] is pool[1]
