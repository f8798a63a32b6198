"""What a watcher believes about another service after one of its replicas says it is leaving
(services/runtime/liveness.py), without a broker: the notice, the probes' answers and the relayed
requests' answers, in the orders they can arrive in."""

from __future__ import annotations

from services.runtime import liveness as module
from services.runtime.liveness import Liveness


async def test_a_leaving_notice_takes_the_long_way_until_a_probe_sent_after_it_answers():
    watcher = Liveness("graph", interval_s=60)
    watcher._set(True)
    out_before = watcher.notices  # a probe already out when the notice comes
    await watcher._heard_leaving(None)
    assert watcher.up is False and watcher.notices == 1
    watcher._probed(True, out_before)  # maybe the leaving replica's own answer: not news
    assert watcher.up is False
    watcher._probed(True, watcher.notices)  # sent after the notice: another replica is running
    assert watcher.up is True


async def test_a_relayed_answer_during_the_leaving_replica_s_grace_says_nothing(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    watcher = Liveness("graph", interval_s=60)
    watcher._set(True)
    await watcher._heard_leaving(None)
    watcher._probed(False, watcher.notices)  # it was the last one
    watcher.saw(True)  # the stopping replica answered a relayed request in its grace
    assert watcher.up is False
    now[0] += 2 * module.LEAVING_GRACE_S + 0.01  # its grace is surely over: an answer is news again
    watcher.saw(True)
    assert watcher.up is True
