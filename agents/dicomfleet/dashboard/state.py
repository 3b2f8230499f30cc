"""Judge each machine's state from its latest heartbeat and its last study: ok, warning, silent or offline.

The order of severity is offline, silent, warning, ok; a machine takes the
worst state that applies and keeps every reason, worst first.
"""

from __future__ import annotations

import dataclasses
import datetime

from dicomfleet.dashboard import timefmt
from dicomfleet.dashboard.config import MachineSettings
from dicomfleet.dashboard.heartbeats import Heartbeat

OK = "ok"
WARNING = "warning"
SILENT = "silent"
OFFLINE = "offline"
STATES = (OK, WARNING, SILENT, OFFLINE)
SEVERITY = {state: rank for rank, state in enumerate(STATES)}

# A heartbeat later than this many intervals is reported as late.
LATE_INTERVALS = 2.5
# An agent clock further off than this is reported, since its times mislead.
CLOCK_SKEW_WARNING_S = 300.0


@dataclasses.dataclass(frozen=True)
class Judgement:
    """A machine's state, why, and the working time measured since images last flowed."""

    state: str
    reasons: tuple[str, ...]
    in_working_hours: bool
    # Working seconds since the last study or file sent; None when nothing ever arrived.
    idle_working_s: float | None

    @property
    def bad(self) -> bool:
        """True for silent and offline, the states that make ``dicomfleet status`` fail."""
        return self.state in (SILENT, OFFLINE)


def _heartbeat_reasons(machine: MachineSettings, heartbeat: Heartbeat,
                       now: datetime.datetime) -> list[tuple[str, str]]:
    reasons = []
    age = (now - heartbeat.received_at).total_seconds()
    if age > machine.offline_after_s:
        reasons.append((OFFLINE, f"no heartbeat for {timefmt.duration(age)}"))
        return reasons
    if age > LATE_INTERVALS * machine.heartbeat_interval_s:
        reasons.append((WARNING, f"heartbeat late: last one {timefmt.duration(age)} ago"))

    if heartbeat.agent_state == "credentials_rejected":
        reasons.append((WARNING, "Orthanc rejects the machine's credentials; nothing is sent"))
    elif heartbeat.agent_state == "orthanc_unreachable":
        reasons.append((WARNING, "the agent cannot reach Orthanc; files wait in the queue"))
    if heartbeat.files_failed:
        reasons.append((WARNING, f"{heartbeat.files_failed} files failed and wait for a retry"))
    if heartbeat.quarantined_today:
        count = heartbeat.quarantined_today
        reasons.append((WARNING, f"{count} file{'' if count == 1 else 's'} quarantined today"))
    oldest = heartbeat.oldest_queued_age_s
    if oldest is not None and oldest > machine.queue_warning_s:
        reasons.append((WARNING, f"the oldest queued file waits for {timefmt.duration(oldest)}"))
    if heartbeat.free_bytes is not None and heartbeat.free_bytes < machine.free_space_warning_bytes:
        reasons.append((WARNING, f"only {timefmt.size(heartbeat.free_bytes)} free in a watch folder"))
    for path, folder in heartbeat.watch_folders.items():
        if not folder.get("exists", True):
            reasons.append((WARNING, f"the watch folder {path} is missing"))
    if heartbeat.sent_at is not None:
        skew = (heartbeat.sent_at - heartbeat.received_at).total_seconds()
        if abs(skew) > CLOCK_SKEW_WARNING_S:
            reasons.append((WARNING, f"the agent's clock is off by {timefmt.duration(abs(skew))}"))
    return reasons


def judge(machine: MachineSettings, heartbeat: Heartbeat | None, last_study_at: datetime.datetime | None,
          now: datetime.datetime) -> Judgement:
    """Return MACHINE's state at NOW (aware, in the site's time zone).

    An agent machine without a recent heartbeat is offline. A machine is silent
    when its working hours passed for ``silent_after_s`` since the later of its
    last study in MongoDB and its agent's last file sent, or when nothing ever
    arrived and it has working hours.
    """
    reasons: list[tuple[str, str]] = []

    if machine.sends_heartbeats:
        if heartbeat is None:
            reasons.append((OFFLINE, "no heartbeat received yet"))
        else:
            reasons.extend(_heartbeat_reasons(machine, heartbeat, now))

    hours = machine.working_hours
    flowed_at = last_study_at
    if heartbeat is not None and heartbeat.last_success_at is not None:
        if flowed_at is None or heartbeat.last_success_at > flowed_at:
            flowed_at = heartbeat.last_success_at

    idle = None
    never_expected = not hours.always and not hours.windows
    if flowed_at is not None:
        idle = hours.seconds_between(flowed_at, now)
        if idle >= machine.silent_after_s:
            reasons.append((SILENT, f"no image for {timefmt.duration(idle)} of working hours "
                                    f"({hours.text})"))
    elif not never_expected:
        reasons.append((SILENT, "no image received yet"))

    reasons.sort(key=lambda item: -SEVERITY[item[0]])
    state = reasons[0][0] if reasons else OK
    return Judgement(state=state, reasons=tuple(text for _, text in reasons),
                     in_working_hours=hours.contains(now), idle_working_s=idle)
