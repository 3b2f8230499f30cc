"""Unit tests of the per-machine circuit breaker and the backoff: one probe at a time, bounded delays."""

from __future__ import annotations

import logging
import random

from dicomfleet.agent.backoff import backoff_delay
from dicomfleet.agent.breaker import AUTH_RETRY_S, MachineBreaker


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock) -> MachineBreaker:
    return MachineBreaker("ct1", "http://127.0.0.1:8042", "ct1", "orthanc-ct1", clock=clock)


def test_backoff_doubles_up_to_cap():
    rng = random.Random(7)
    delays = [backoff_delay(attempt, rng=rng) for attempt in range(1, 12)]

    assert 0.8 <= delays[0] <= 1.2
    assert 1.6 <= delays[1] <= 2.4
    assert 3.2 <= delays[2] <= 4.8
    assert all(delay <= 60.0 for delay in delays)
    assert delays[-1] >= 48.0


def test_breaker_one_probe_after_failure(caplog):
    clock = FakeClock()
    breaker = _breaker(clock)
    caplog.set_level(logging.DEBUG, "dicomfleet.agent.breaker")

    delay = breaker.unreachable("connection refused")
    assert breaker.may_send() is False
    clock.now += delay

    assert breaker.may_send() is True
    breaker.begin_send()
    assert breaker.may_send() is False
    assert breaker.describe() == "orthanc_unreachable"


def test_breaker_logs_outage_once(caplog):
    clock = FakeClock()
    breaker = _breaker(clock)
    caplog.set_level(logging.INFO, "dicomfleet.agent.breaker")

    for _ in range(8):
        clock.now += breaker.unreachable("connection refused")
        breaker.begin_send()
    quiet_warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    clock.now += 600
    breaker.unreachable("connection refused")
    released = breaker.succeeded()

    assert len(quiet_warnings) == 1
    assert "unreachable for machine ct1" in quiet_warnings[0].getMessage()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "still unreachable for machine ct1: 9 failed attempts" in warnings[1]
    assert released is True
    assert "reachable again for machine ct1 after 9 failed attempts" in caplog.text
    assert breaker.may_send() is True


def test_breaker_single_failure_keeps_backlog():
    clock = FakeClock()
    breaker = _breaker(clock)

    breaker.unreachable("HTTP 500")

    assert breaker.succeeded() is False


def test_breaker_auth_rejection_waits(caplog):
    clock = FakeClock()
    breaker = _breaker(clock)
    caplog.set_level(logging.INFO, "dicomfleet.agent.breaker")

    assert breaker.auth_rejected(401) == AUTH_RETRY_S
    clock.now += AUTH_RETRY_S - 1
    assert breaker.may_send() is False
    clock.now += 1
    assert breaker.may_send() is True
    breaker.begin_send()
    breaker.auth_rejected(401)

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "rejected the credentials of machine ct1 (user ct1, HTTP 401)" in errors[0].getMessage()
    assert breaker.describe() == "credentials_rejected"
