"""The retry policy: backoff, jitter, attempts, which failures retry, the deadline and Retry-After.

Time is a fake clock that a fake sleep advances: nothing here really waits.
"""

from __future__ import annotations

import asyncio

import pytest

from contracts.errors import DeadlineExceeded, InvalidRequest, RateLimited
from services.runtime.retry import RetryPolicy, call_with_retries

STEADY = RetryPolicy(initial_interval_s=0.1, multiplier=2.0, max_interval_s=1.0, max_attempts=None, jitter=0.0)


class FakeTime:
    """A clock that only moves when the code under test sleeps (by ``overshoot`` more, if set)."""

    def __init__(self, overshoot: float = 0.0) -> None:
        self.now = 0.0
        self.overshoot = overshoot
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + self.overshoot


class Flaky:
    """An attempt that fails ``failures`` times (or for ever), then answers; it notes when it started."""

    def __init__(self, time: FakeTime, failures: int | None = None, error: type[Exception] = RateLimited) -> None:
        self.time = time
        self.failures = failures
        self.error = error
        self.started: list[float] = []
        self.raised: list[Exception] = []

    async def __call__(self) -> str:
        self.started.append(self.time.now)
        if self.failures is None or len(self.started) <= self.failures:
            error = self.error(f"failure {len(self.started)}")
            self.raised.append(error)
            raise error
        return "answer"


def retry(attempt, policy, time, **options):
    options.setdefault("retry_if", lambda error: isinstance(error, RateLimited))
    return call_with_retries(attempt, policy, sleep=time.sleep, clock=time.clock, **options)


def test_backoff_grows_by_the_multiplier_and_stays_at_the_cap():
    assert [STEADY.backoff(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_backoff_of_a_retry_that_never_stops_stays_at_the_cap():
    assert STEADY.backoff(100_000) == 1.0  # no overflow after a long outage


@pytest.mark.parametrize("retry_number", [1, 2, 3, 10])
def test_jitter_stays_within_its_bounds_and_under_the_cap(retry_number):
    policy = RetryPolicy(initial_interval_s=0.1, multiplier=2.0, max_interval_s=1.0, jitter=0.5)
    base = STEADY.backoff(retry_number)
    lowest, highest = policy.backoff(retry_number, lambda: 0.0), policy.backoff(retry_number, lambda: 0.999999)
    assert lowest == pytest.approx(base * 0.5)
    assert highest == pytest.approx(min(base * 1.5, 1.0), rel=1e-5)
    samples = [policy.backoff(retry_number) for _ in range(1000)]
    assert all(lowest <= delay <= highest for delay in samples)
    assert len(set(samples)) > 1  # the delays do vary: callers failing together spread out


async def test_the_first_success_is_returned_without_a_sleep():
    time = FakeTime()
    assert await retry(Flaky(time, failures=0), STEADY, time) == "answer"
    assert time.sleeps == []


async def test_failures_worth_retrying_are_retried_with_growing_pauses_until_success():
    time = FakeTime()
    attempt = Flaky(time, failures=3)
    assert await retry(attempt, STEADY, time) == "answer"
    assert time.sleeps == pytest.approx([0.1, 0.2, 0.4])
    assert len(attempt.started) == 4


async def test_max_attempts_counts_the_first_and_the_last_failure_is_raised_as_is():
    time = FakeTime()
    attempt = Flaky(time)
    with pytest.raises(RateLimited) as failure:
        await retry(attempt, RetryPolicy(max_attempts=3, jitter=0.0), time)
    assert len(attempt.started) == 3 and len(time.sleeps) == 2
    assert failure.value is attempt.raised[-1]


async def test_a_single_attempt_policy_does_not_retry():
    time = FakeTime()
    attempt = Flaky(time)
    with pytest.raises(RateLimited):
        await retry(attempt, RetryPolicy(max_attempts=1), time)
    assert len(attempt.started) == 1 and time.sleeps == []


async def test_a_failure_not_worth_retrying_is_raised_at_once():
    time = FakeTime()
    attempt = Flaky(time, failures=1, error=InvalidRequest)
    with pytest.raises(InvalidRequest) as failure:
        await retry(attempt, STEADY, time)
    assert failure.value is attempt.raised[0]
    assert len(attempt.started) == 1 and time.sleeps == []


async def test_a_later_failure_not_worth_retrying_stops_the_retries():
    time = FakeTime()
    errors = iter([RateLimited("busy"), InvalidRequest("bad"), RateLimited("never reached")])

    async def attempt():
        raise next(errors)

    with pytest.raises(InvalidRequest, match="bad"):
        await retry(attempt, STEADY, time)
    assert len(time.sleeps) == 1


async def test_the_deadline_stops_retries_before_a_sleep_would_reach_it():
    time = FakeTime()
    attempt = Flaky(time)
    with pytest.raises(RateLimited) as failure:
        await retry(attempt, STEADY, time, deadline=1.0)
    # Tries at 0, 0.1, 0.3, 0.7; the next pause (0.8) would end past 1.0, so none is taken.
    assert attempt.started == pytest.approx([0.0, 0.1, 0.3, 0.7])
    assert time.now <= 1.0
    assert failure.value is attempt.raised[-1]


async def test_no_attempt_starts_after_a_sleep_that_overran_the_deadline():
    time = FakeTime(overshoot=2.0)  # a loop too busy to wake the sleeper on time
    attempt = Flaky(time)
    with pytest.raises(RateLimited) as failure:
        await retry(attempt, STEADY, time, deadline=1.0)
    assert attempt.started == [0.0]
    assert failure.value is attempt.raised[0]


async def test_a_deadline_already_passed_allows_no_attempt():
    time = FakeTime()
    time.now = 5.0
    attempt = Flaky(time, failures=0)
    with pytest.raises(DeadlineExceeded):
        await retry(attempt, STEADY, time, deadline=5.0)
    assert attempt.started == []


async def test_the_servers_retry_after_replaces_the_backoff():
    time = FakeTime()
    attempt = Flaky(time, failures=2)
    answer = await retry(attempt, STEADY, time, server_delay=lambda error: 3.0, deadline=10.0)
    assert answer == "answer"
    assert time.sleeps == [3.0, 3.0]  # what the server asked for, even above the backoff's cap


async def test_a_retry_after_past_the_deadline_gives_up_at_once():
    time = FakeTime()
    attempt = Flaky(time)
    with pytest.raises(RateLimited) as failure:
        await retry(attempt, STEADY, time, server_delay=lambda error: 5.0, deadline=3.0)
    assert time.sleeps == [] and len(attempt.started) == 1
    assert failure.value is attempt.raised[0]


async def test_no_retry_after_falls_back_to_the_backoff():
    time = FakeTime()
    await retry(Flaky(time, failures=2), STEADY, time, server_delay=lambda error: None)
    assert time.sleeps == pytest.approx([0.1, 0.2])


async def test_each_retry_is_announced_with_its_failure_and_pause():
    time = FakeTime()
    heard: list[tuple[str, float]] = []
    await retry(Flaky(time, failures=2), STEADY, time, on_retry=lambda error, delay: heard.append((str(error), delay)))
    assert heard == [("failure 1", pytest.approx(0.1)), ("failure 2", pytest.approx(0.2))]


async def test_cancellation_is_never_retried():
    time = FakeTime()
    calls = 0

    async def attempt():
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RateLimited("busy")
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await retry(attempt, STEADY, time, retry_if=lambda error: True)
    assert calls == 2


@pytest.mark.parametrize(
    "settings",
    [
        {"initial_interval_s": -1},
        {"initial_interval_s": 2, "max_interval_s": 1},
        {"multiplier": 0.5},
        {"max_attempts": 0},
        {"jitter": 1.5},
    ],
)
def test_a_policy_that_makes_no_sense_is_refused(settings):
    with pytest.raises(ValueError, match="retry policy"):
        RetryPolicy(**settings)
