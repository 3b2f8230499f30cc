"""Turn timed runs into the figures the benchmark page reports: rates, percentiles and ratios.

Pure functions only; the tests check them without starting any server.
"""

from __future__ import annotations

import dataclasses
import math
import statistics


@dataclasses.dataclass
class TimedRun:
    """One client sending a set of files: how many, how long, and how many Orthanc stored."""

    name: str
    files: int
    seconds: float
    stored: int
    command: str
    note: str = ""

    @property
    def complete(self) -> bool:
        """True when Orthanc stored every file the client sent."""
        return self.stored == self.files

    @property
    def files_per_s(self) -> float | None:
        """Files per second, or None when the run did not store every file."""
        if not self.complete or self.seconds <= 0:
            return None
        return self.files / self.seconds


def median_rate(runs: list[TimedRun]) -> float | None:
    """Return the median files per second of RUNS, or None when any run is incomplete.

    One incomplete repetition makes the figure untrustworthy, so it is not reported.
    """
    if not runs:
        return None
    rates = [run.files_per_s for run in runs]
    if any(rate is None for rate in rates):
        return None
    return statistics.median(rates)


def percentile(values: list[float], fraction: float) -> float | None:
    """Return the FRACTION percentile of VALUES (0.5 for the median), with linear interpolation.

    This is the "linear" method of numpy.percentile, the usual default; None when VALUES is empty.
    """
    if not values:
        return None
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"The percentile fraction {fraction} is outside 0 to 1.")

    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = math.floor(position)
    upper = math.ceil(position)
    if lower == upper:
        return ordered[lower]
    weight = position - lower
    return ordered[lower] * (1 - weight) + ordered[upper] * weight


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """Return NUMERATOR / DENOMINATOR, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def rounded(value: float | None, digits: int = 3) -> float | None:
    """Round VALUE to DIGITS significant digits for the report, keeping None."""
    if value is None or value == 0:
        return value
    magnitude = math.floor(math.log10(abs(value)))
    return round(value, max(0, digits - 1 - magnitude))
