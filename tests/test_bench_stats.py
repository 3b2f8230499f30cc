"""Unit tests of bench.stats: rates of timed runs, percentiles, ratios and rounding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# bench/ is a top-level package of the checkout, not part of the installed dicomfleet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stats import TimedRun, median_rate, percentile, ratio, rounded  # noqa: E402


def _run(files: int, seconds: float, stored: int | None = None) -> TimedRun:
    return TimedRun("client", files, seconds, files if stored is None else stored, "command")


def test_files_per_s_complete_run():
    assert _run(300, 1.5).files_per_s == 200.0


def test_files_per_s_incomplete_run_is_none():
    assert _run(300, 1.5, stored=299).files_per_s is None


def test_files_per_s_zero_seconds_is_none():
    assert _run(300, 0.0).files_per_s is None


def test_median_rate_odd_count():
    runs = [_run(100, 1.0), _run(100, 2.0), _run(100, 4.0)]
    assert median_rate(runs) == 50.0


def test_median_rate_one_incomplete_run_is_none():
    runs = [_run(100, 1.0), _run(100, 2.0, stored=99)]
    assert median_rate(runs) is None


def test_median_rate_no_runs_is_none():
    assert median_rate([]) is None


@pytest.mark.parametrize("fraction, expected", [
    (0.0, 1.0),
    (0.5, 3.0),
    (1.0, 5.0),
    (0.25, 2.0),
    (0.99, 4.96),
])
def test_percentile_linear_interpolation(fraction, expected):
    assert percentile([5.0, 1.0, 4.0, 2.0, 3.0], fraction) == pytest.approx(expected)


def test_percentile_empty_is_none():
    assert percentile([], 0.5) is None


def test_percentile_fraction_out_of_range_raises():
    with pytest.raises(ValueError, match="outside 0 to 1"):
        percentile([1.0], 1.5)


def test_ratio_of_two_values():
    assert ratio(3.0, 1.5) == 2.0


@pytest.mark.parametrize("numerator, denominator", [(None, 1.0), (1.0, None), (1.0, 0.0)])
def test_ratio_missing_or_zero_is_none(numerator, denominator):
    assert ratio(numerator, denominator) is None


@pytest.mark.parametrize("value, expected", [
    (84.6387, 84.6),
    (0.0123456, 0.0123),
    (1234.5678, 1235.0),
    (0.0, 0.0),
    (None, None),
])
def test_rounded_three_significant_digits(value, expected):
    assert rounded(value) == expected
