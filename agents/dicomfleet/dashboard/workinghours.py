"""Parse a machine's working hours ("Mon-Fri 07:00-19:00") and measure time spent inside them.

A machine is expected to send images only during its working hours, so it is
silent when those hours, not the wall clock, pass without a study.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import functools
import math
import re

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ALWAYS = "always"
NEVER = "never"

_ENTRY = re.compile(r"^(?P<days>[a-z]{3}(?:-[a-z]{3})?|daily)\s+(?P<start>\d{2}:\d{2})-(?P<end>\d{2}:\d{2})$")

# The maximum stretch measured backwards. A machine idle for longer is
# reported with the working seconds of this stretch only.
MAX_LOOKBACK_DAYS = 15


class WorkingHoursError(ValueError):
    """Raised with a sentence saying why a working hours text is invalid."""


@dataclasses.dataclass(frozen=True)
class Window:
    """One weekly window: a weekday (0 is Monday) and minutes from that day's midnight.

    ``end_minute`` may exceed 1440 for a shift that ends after midnight.
    """

    weekday: int
    start_minute: int
    end_minute: int


def _minutes(text: str, allow_24: bool) -> int:
    hours, minutes = (int(part) for part in text.split(":"))
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not allow_24)):
        raise WorkingHoursError(f"{text!r} is not a time of day between 00:00 and 24:00")
    return hours * 60 + minutes


def _day_range(text: str) -> list[int]:
    if text == "daily":
        return list(range(7))
    names = text.split("-")
    for name in names:
        if name not in DAYS:
            raise WorkingHoursError(f"{name!r} is not a weekday; use Mon, Tue, Wed, Thu, Fri, Sat or Sun")
    first = DAYS.index(names[0])
    last = DAYS.index(names[-1])
    days = [first]
    while days[-1] != last:
        days.append((days[-1] + 1) % 7)
    return days


def _wall_clock(day: datetime.date, minute: int, zone: datetime.tzinfo | None) -> datetime.datetime:
    """Return the moment MINUTE minutes of wall-clock time after DAY's midnight; MINUTE may pass 1440."""
    extra_days, minute = divmod(minute, 1440)
    return datetime.datetime.combine(day + datetime.timedelta(days=extra_days),
                                     datetime.time(minute // 60, minute % 60), tzinfo=zone)


@dataclasses.dataclass(frozen=True)
class WorkingHours:
    """A weekly schedule; ``text`` is the inventory's value it was parsed from."""

    text: str
    windows: tuple[Window, ...]

    @property
    def always(self) -> bool:
        """True when every moment of the week is working time."""
        return self.text.strip().lower() == ALWAYS

    def contains(self, moment: datetime.datetime) -> bool:
        """Return True when the timezone-aware MOMENT falls inside a window."""
        if self.always:
            return True
        minute = moment.hour * 60 + moment.minute
        weekday = moment.weekday()
        for window in self.windows:
            if window.weekday == weekday and window.start_minute <= minute < window.end_minute:
                return True
            # A shift from the previous day that runs past midnight.
            if (window.weekday + 1) % 7 == weekday and minute < window.end_minute - 1440:
                return True
        return False

    def seconds_between(self, start: datetime.datetime, end: datetime.datetime) -> float:
        """Return the working seconds between the aware datetimes START and END.

        Only the last MAX_LOOKBACK_DAYS days before END are counted.
        """
        if end <= start:
            return 0.0
        earliest = end - datetime.timedelta(days=MAX_LOOKBACK_DAYS)
        start = max(start, earliest)
        if self.always:
            return (end - start).total_seconds()

        timeline = _timeline(self, end.tzinfo, math.ceil(end.timestamp() / 60) * 60)
        return timeline.seconds_until(end.timestamp()) - timeline.seconds_until(start.timestamp())


class _Timeline:
    """The working intervals of a schedule over the days before a moment, as merged Unix time ranges.

    A cumulative sum makes the working seconds up to any moment a binary search,
    so judging many machines with the same schedule costs one timeline.
    """

    def __init__(self, intervals: list[tuple[float, float]]):
        merged: list[list[float]] = []
        for opens, closes in sorted(intervals):
            if merged and opens <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], closes)
            else:
                merged.append([opens, closes])
        self.opens = [interval[0] for interval in merged]
        self.closes = [interval[1] for interval in merged]
        self.before = [0.0]
        for opens, closes in merged:
            self.before.append(self.before[-1] + closes - opens)

    def seconds_until(self, moment: float) -> float:
        """Return the working seconds from the timeline's start up to MOMENT (Unix time)."""
        index = bisect.bisect_right(self.opens, moment) - 1
        if index < 0:
            return 0.0
        return self.before[index] + min(moment, self.closes[index]) - self.opens[index]


@functools.lru_cache(maxsize=64)
def _timeline(hours: WorkingHours, zone: datetime.tzinfo | None, end: float) -> _Timeline:
    """Return HOURS' intervals from MAX_LOOKBACK_DAYS + 1 days before END (Unix time) up to END.

    Windows are wall-clock times; building them as Unix times counts a day
    that changes its UTC offset with its real length.
    """
    last_day = datetime.datetime.fromtimestamp(end, zone).date()
    day = last_day - datetime.timedelta(days=MAX_LOOKBACK_DAYS + 2)
    intervals = []
    while day <= last_day:
        for window in hours.windows:
            if window.weekday == day.weekday():
                intervals.append((_wall_clock(day, window.start_minute, zone).timestamp(),
                                  _wall_clock(day, window.end_minute, zone).timestamp()))
        day += datetime.timedelta(days=1)
    return _Timeline(intervals)


def parse(text: str) -> WorkingHours:
    """Parse TEXT such as ``Mon-Fri 07:00-19:00, Sat 08:00-12:00``, ``always`` or ``never``.

    Days are English three-letter abbreviations or ``daily``; an end time
    before the start time means the shift ends on the next day.
    Raises WorkingHoursError naming the part that is invalid.
    """
    if not isinstance(text, str) or not text.strip():
        raise WorkingHoursError("working hours must be a text such as 'Mon-Fri 07:00-19:00', 'always' or 'never'")
    normal = text.strip().lower()
    if normal in (ALWAYS, NEVER):
        return WorkingHours(text=normal, windows=())

    windows = []
    for entry in normal.split(","):
        entry = " ".join(entry.split())
        match = _ENTRY.match(entry)
        if not match:
            raise WorkingHoursError(f"{entry!r} is not of the form 'Mon-Fri 07:00-19:00'")
        start = _minutes(match.group("start"), allow_24=False)
        end = _minutes(match.group("end"), allow_24=True)
        if end == start:
            raise WorkingHoursError(f"{entry!r} starts and ends at the same time")
        if end < start:
            end += 1440
        for weekday in _day_range(match.group("days")):
            windows.append(Window(weekday, start, end))
    return WorkingHours(text=text.strip(), windows=tuple(windows))


def problem(value: object) -> str | None:
    """Return why VALUE is not valid working hours, or None when it is (for the inventory's checks)."""
    try:
        parse(value)  # type: ignore[arg-type]
    except WorkingHoursError as error:
        return str(error)
    return None
