"""Retry calls to Orthanc and MongoDB with capped exponential backoff.

An outage is logged once when it starts, again only if its error changes, and
once when the dependency is back, with the number of failed attempts in between.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
MAX_MESSAGE_LENGTH = 300


class Stopped(Exception):
    """Raised inside a wait or a retry loop once the service has been asked to stop."""


class Outage:
    """The reachable or unreachable state of one dependency, such as Orthanc or MongoDB."""

    def __init__(self, name: str):
        self.name = name
        self.down_since: float | None = None
        self.failed_attempts = 0
        self.last_error_kind: str | None = None
        # Incremented each time the dependency comes back after failures.
        self.recoveries = 0
        # When a call last succeeded (Unix time), or None before the first success.
        self.last_success_at: float | None = None

    def failed(self, error: BaseException, action: str, delay: float) -> None:
        """Record a failed attempt at ACTION; log it if the outage starts or its error changes."""
        kind = type(error).__name__
        self.failed_attempts += 1
        # pymongo appends its whole topology description to server selection errors.
        message = str(error)
        if len(message) > MAX_MESSAGE_LENGTH:
            message = message[:MAX_MESSAGE_LENGTH] + "..."

        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("%s is unavailable while %s: %s: %s. Retrying with backoff "
                        "(first retry in %.0f s, then at most every %.0f s).",
                        self.name, action, kind, message, delay, MAX_DELAY_S)
        elif kind != self.last_error_kind:
            log.warning("%s is still unavailable while %s, now with %s: %s (failed attempts so far: %d).",
                        self.name, action, kind, message, self.failed_attempts)
        else:
            log.debug("%s is still unavailable while %s: %s: %s (attempt %d, next in %.1f s).",
                      self.name, action, kind, message, self.failed_attempts, delay)
        self.last_error_kind = kind

    def succeeded(self) -> None:
        """Record a success; log the recovery if the dependency was down."""
        self.last_success_at = time.time()
        if self.down_since is None:
            return

        seconds = time.monotonic() - self.down_since
        log.info("%s is available again after %.0f s (failed attempts: %d).",
                 self.name, seconds, self.failed_attempts)
        self.down_since = None
        self.failed_attempts = 0
        self.last_error_kind = None
        self.recoveries += 1


def backoff_delays(first: float = FIRST_DELAY_S, cap: float = MAX_DELAY_S):
    """Yield delays that double from FIRST up to CAP, each with up to 20 % random jitter below it."""
    delay = first
    while True:
        yield delay * random.uniform(0.8, 1.0)
        delay = min(delay * 2, cap)


def wait_or_stop(stop: threading.Event, seconds: float) -> None:
    """Sleep SECONDS, or raise Stopped as soon as STOP is set."""
    if stop.wait(seconds):
        raise Stopped()


def call_with_retry(call: Callable[[], T], *, outage: Outage, transient: tuple[type[BaseException], ...],
                    action: str, stop: threading.Event, max_attempts: int | None = None) -> T:
    """Return CALL's result, retrying on TRANSIENT errors with backoff until it succeeds.

    ACTION names what is being done, with its ids, for the log. With
    MAX_ATTEMPTS, the last error is raised after that many failures. Without
    it, the loop ends only on success, or with Stopped once STOP is set.
    """
    delays = backoff_delays()
    attempts = 0
    while True:
        if stop.is_set():
            raise Stopped()

        try:
            result = call()
        except transient as error:
            attempts += 1
            delay = next(delays)
            outage.failed(error, action, delay)
            if max_attempts is not None and attempts >= max_attempts:
                raise
            wait_or_stop(stop, delay)
            continue

        outage.succeeded()
        return result
