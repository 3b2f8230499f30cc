"""Format durations and times for the dashboard's pages, the status table and log lines.

Times are shown in the site's time zone; durations in the largest two units that fit.
"""

from __future__ import annotations

import datetime


def duration(seconds: float | None) -> str:
    """Return SECONDS as ``45 s``, ``12 min``, ``3 h 5 min`` or ``2 d 4 h``; ``-`` for None."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def moment(value: datetime.datetime | None, zone: datetime.tzinfo | None,
           now: datetime.datetime | None = None) -> str:
    """Return VALUE in ZONE as ``14:05`` when it is on NOW's day, else ``2024-03-01 14:05``; ``never`` for None."""
    if value is None:
        return "never"
    local = value.astimezone(zone)
    if now is not None and local.date() == now.astimezone(zone).date():
        return local.strftime("%H:%M:%S")
    return local.strftime("%Y-%m-%d %H:%M")


def size(number_of_bytes: float | None) -> str:
    """Return a byte count as ``512 MB``, ``1.4 GB`` or ``2.0 TB`` (powers of 1024); ``-`` for None."""
    if number_of_bytes is None:
        return "-"
    value = float(number_of_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit in ("B", "KB", "MB") else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"
