"""The monitor's per-second figures: counters turned into deltas, kept in 60-slot rings.

No NATS here. Every replica of every service reports *cumulative* counters (since it started);
:class:`Deltas` keeps the last reading per replica and gives the increase since then (a counter
that went down means the replica restarted: the new value is the increase). :class:`Ring` holds
one number per second for the last ``SLOTS`` seconds, written lazily: a slot not written since
its second passed reads as 0, so an idle ring costs nothing per tick.

Histograms are the runtime's fixed buckets (``services.runtime.stats.BUCKET_BOUNDS_S``); a
percentile over some seconds is :func:`services.runtime.stats.quantile_ms` of the bucket deltas
summed over those seconds. To keep memory small the bucket deltas are kept in ``COARSE_S``-second
groups (six groups cover the minute), so a window percentile covers 60 to 70 seconds.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

from services.runtime.stats import BUCKET_BOUNDS_S, quantile_ms

SLOTS = 60  # seconds in the window
RATE_S = 10  # a "rate" is messages per second over the last RATE_S seconds
COARSE_S = 10  # bucket deltas are grouped by this many seconds
COARSE_SLOTS = SLOTS // COARSE_S + 1  # one more group: the current one fills while the oldest ages
BUCKETS = len(BUCKET_BOUNDS_S) + 1
_ZEROS = array("i", bytes(4 * BUCKETS))


class Ring:
    """One number per second for the last ``SLOTS`` seconds; ``tick`` is the monitor's second.

    Integers by default; ``Ring("f")`` holds floats, NaN where nothing was written (a percentile
    of a second without messages)."""

    __slots__ = ("_empty", "_last", "_values")

    def __init__(self, typecode: str = "i") -> None:
        self._empty = 0 if typecode == "i" else float("nan")
        self._values = array(typecode, [self._empty]) * SLOTS
        self._last = -SLOTS  # the last tick written

    def add(self, tick: int, value: float) -> None:
        self._age(tick)
        self._values[tick % SLOTS] += value

    def set(self, tick: int, value: float) -> None:
        self._age(tick)
        self._values[tick % SLOTS] = value

    def _age(self, tick: int) -> None:
        if tick <= self._last:
            return
        for stale in range(max(self._last + 1, tick - SLOTS + 1), tick + 1):
            self._values[stale % SLOTS] = self._empty
        self._last = tick

    def series(self, tick: int) -> list[float]:
        """The last ``SLOTS`` seconds up to ``tick``, oldest first (empty where nothing was written)."""
        out = []
        for second in range(tick - SLOTS + 1, tick + 1):
            fresh = self._last - SLOTS < second <= self._last
            out.append(self._values[second % SLOTS] if fresh else self._empty)
        return out

    def total(self, tick: int, seconds: int = SLOTS) -> int:
        """The sum of the last ``seconds`` seconds up to ``tick``."""
        low = max(tick - seconds + 1, self._last - SLOTS + 1)
        high = min(tick, self._last)
        return sum(self._values[second % SLOTS] for second in range(low, high + 1))


class CoarseHistogram:
    """Bucket deltas summed per ``COARSE_S`` seconds, for percentiles over the window."""

    __slots__ = ("_counts", "_last")

    def __init__(self) -> None:
        self._counts = array("i", bytes(4 * BUCKETS * COARSE_SLOTS))
        self._last = -COARSE_SLOTS

    def add(self, tick: int, deltas: Iterable[tuple[int, int]]) -> None:
        group = tick // COARSE_S
        if group > self._last:
            for stale in range(max(self._last + 1, group - COARSE_SLOTS + 1), group + 1):
                base = (stale % COARSE_SLOTS) * BUCKETS
                self._counts[base : base + BUCKETS] = _ZEROS
            self._last = group
        base = (group % COARSE_SLOTS) * BUCKETS
        for bucket, count in deltas:
            self._counts[base + bucket] += count

    def merge_into(self, tick: int, into: list[int]) -> None:
        """Add the last window's counts (60 to 70 seconds) to ``into``."""
        group = tick // COARSE_S
        for g in range(max(group - COARSE_SLOTS + 1, self._last - COARSE_SLOTS + 1), min(group, self._last) + 1):
            base = (g % COARSE_SLOTS) * BUCKETS
            for bucket in range(BUCKETS):
                into[bucket] += self._counts[base + bucket]


def percentiles(counts: Sequence[int]) -> tuple[float | None, float | None]:
    """(p50, p99) in milliseconds of a histogram's counts; (None, None) when it is empty."""
    total = sum(counts)
    return quantile_ms(counts, total, 0.50), quantile_ms(counts, total, 0.99)


def counter_delta(previous: int | None, current: int) -> int:
    """The increase of a cumulative counter; a decrease is a restart (the new value is the increase)."""
    if previous is None:
        return current
    return current - previous if current >= previous else current


def dict_delta(previous: dict[str, int] | None, current: dict[str, int]) -> dict[str, int]:
    """Per-key increases of a dict of counters (errors by code); restarts as in :func:`counter_delta`."""
    previous = previous or {}
    restarted = any(current.get(key, 0) < value for key, value in previous.items())
    out = {}
    for key, value in current.items():
        delta = value if restarted else value - previous.get(key, 0)
        if delta:
            out[key] = delta
    return out


def bucket_delta(previous: Sequence[int] | None, current: Sequence[int], restarted: bool) -> list[tuple[int, int]]:
    """The (bucket, increase) pairs of a histogram's counts, only the non-zero ones."""
    if previous is None or restarted or len(previous) != len(current):
        return [(i, n) for i, n in enumerate(current) if n]
    return [(i, n - p) for i, (n, p) in enumerate(zip(current, previous, strict=True)) if n > p]
