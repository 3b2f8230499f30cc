"""Log a recurring problem once, count its repeats, and log once more when it clears.

A folder that stays unreadable or a watch limit that stays reached must not
write one line per rescan.
"""

from __future__ import annotations

import logging
import threading
import time


class RepeatedProblems:
    """Problems keyed by what they concern, each logged when it starts and when it clears; thread-safe."""

    def __init__(self, logger: logging.Logger, reminder_s: float = 3600.0):
        self.logger = logger
        self.reminder_s = reminder_s
        self._lock = threading.Lock()
        # key -> [message, first time, last logged time, repeats]
        self._open: dict[object, list] = {}

    def report(self, key: object, message: str, level: int = logging.WARNING) -> None:
        """Log MESSAGE when KEY's problem is new or an hour has passed; otherwise count it."""
        now = time.monotonic()
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                self._open[key] = [message, now, now, 0]
                first, remind = True, False
            else:
                entry[0] = message
                entry[3] += 1
                first = False
                remind = now - entry[2] >= self.reminder_s
                if remind:
                    entry[2] = now
                repeats, since = entry[3], now - entry[1]

        if first:
            self.logger.log(level, "%s", message)
        elif remind:
            self.logger.log(level, "%s (still failing, %d repeats since it started %.0f s ago)",
                            message, repeats, since)

    def clear(self, key: object, message: str | None = None) -> None:
        """Forget KEY's problem; log MESSAGE with the repeat count when it was open."""
        with self._lock:
            entry = self._open.pop(key, None)
        if entry is not None and message:
            self.logger.info("%s (after %d repeats over %.0f s)", message, entry[3],
                             time.monotonic() - entry[1])

    def is_open(self, key: object) -> bool:
        """Return True while KEY's problem has not cleared."""
        with self._lock:
            return key in self._open
