"""One retry policy for every call that may be tried again: model servers, HTTP tools, the audit trail.

:func:`call_with_retries` runs an attempt under a :class:`RetryPolicy` (exponential backoff with
jitter, a cap on each delay and on the number of attempts), bounded by an absolute deadline: no
attempt starts and no sleep ends past it, and when time or attempts run out the last failure is
raised as it is, so the caller's typed error reaches the user. A server's own delay (Retry-After)
replaces the backoff, still within the deadline. The loop itself is tenacity's.

Deadlines are ``time.monotonic()`` values (the clock of the default asyncio loop and of the graph
executor's deadlines); uvloop's ``loop.time()`` is coarser, so it is not used here.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from contracts.errors import DeadlineExceeded

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to try again.

    The n-th retry waits ``initial_interval_s * multiplier ** (n - 1)``, scaled by a random factor
    in ``[1 - jitter, 1 + jitter]`` (so that callers failing together do not retry together), and
    never more than ``max_interval_s``. ``max_attempts`` counts the first attempt; None means no
    limit (then a deadline, or the caller's patience, is the only bound).
    """

    initial_interval_s: float = 0.1
    multiplier: float = 2.0
    max_interval_s: float = 5.0
    max_attempts: int | None = 3
    jitter: float = 0.5

    def __post_init__(self) -> None:
        # Policies are constants in code: a bad one is a programming error, caught at import.
        if self.initial_interval_s < 0 or self.max_interval_s < self.initial_interval_s:
            raise ValueError("a retry policy needs 0 <= initial_interval_s <= max_interval_s")
        if self.multiplier < 1:
            raise ValueError("a retry policy's multiplier must be at least 1 (delays never shrink)")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("a retry policy allows at least one attempt")
        if not 0 <= self.jitter <= 1:
            raise ValueError("a retry policy's jitter is a fraction between 0 and 1")

    def backoff(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """The delay before the ``retry``-th retry (1 for the first), jitter included."""
        try:
            grown = self.initial_interval_s * self.multiplier ** (retry - 1)
        except OverflowError:  # a retry that never stops reaches huge exponents; the cap holds them
            grown = math.inf
        delay = min(grown, self.max_interval_s) * (1 - self.jitter + 2 * self.jitter * rand())
        return min(delay, self.max_interval_s)


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    retry_if: Callable[[Exception], bool],
    deadline: float | None = None,
    server_delay: Callable[[Exception], float | None] | None = None,
    on_retry: Callable[[Exception, float], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Await ``attempt()`` until it succeeds, a failure is not worth another try, or the policy's
    attempts or the ``deadline`` run out; then raise the last failure unchanged.

    ``retry_if`` says which failures are worth another try (cancellation never is).
    ``server_delay`` may read a delay the server asked for (Retry-After) from a failure; it is
    used instead of the backoff. ``on_retry`` hears each failure and the delay before the next
    try (for a log line). ``sleep`` and ``clock`` are replaceable for tests.
    """
    if deadline is not None and clock() >= deadline:
        raise DeadlineExceeded("the deadline passed before the first attempt")
    # Most calls succeed at once: they skip tenacity's machinery (measured: 18 µs a call; this path 0.3 µs).
    try:
        return await attempt()
    except Exception as error:
        first = error
    if not retry_if(first) or policy.max_attempts == 1:
        raise first
    last = first
    replay = True

    async def again() -> T:
        # tenacity counts the direct attempt above as its first: it is replayed, not repeated.
        nonlocal last, replay
        if replay:
            replay = False
            raise last
        if deadline is not None and clock() >= deadline:
            raise last  # the sleep overran the deadline: no attempt starts past it
        try:
            return await attempt()
        except Exception as error:
            last = error
            raise

    def wait(state: tenacity.RetryCallState) -> float:
        asked = server_delay(last) if server_delay is not None else None
        return max(0.0, asked) if asked is not None else policy.backoff(state.attempt_number)

    def stop(state: tenacity.RetryCallState) -> bool:
        if policy.max_attempts is not None and state.attempt_number >= policy.max_attempts:
            return True
        # upcoming_sleep is set by wait() just before: stop when the sleep would reach the deadline.
        return deadline is not None and clock() + state.upcoming_sleep >= deadline

    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None:
            on_retry(last, state.upcoming_sleep)

    retrying = tenacity.AsyncRetrying(
        sleep=sleep,
        stop=stop,
        wait=wait,
        retry=tenacity.retry_if_exception(lambda error: isinstance(error, Exception) and retry_if(error)),
        before_sleep=before_sleep,
        reraise=True,
    )
    return await retrying(again)
