"""Exponential backoff with jitter for retrying a file or a machine after an error.

The first retry waits about 1 s, each further one twice as long, up to 60 s.
"""

from __future__ import annotations

import random

START_S = 1.0
CAP_S = 60.0
# Each delay is scaled by a random factor in this range, so retries of many files spread out.
JITTER = (0.8, 1.2)


def backoff_delay(attempt: int, start: float = START_S, cap: float = CAP_S,
                  rng: random.Random | None = None) -> float:
    """Return the seconds to wait before retry number ATTEMPT (1 for the first retry)."""
    rng = rng or random
    exponent = min(max(attempt, 1) - 1, 32)
    delay = min(cap, start * 2 ** exponent)
    return min(cap, delay * rng.uniform(*JITTER))
