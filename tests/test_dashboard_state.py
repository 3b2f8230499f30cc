"""Machine states (ok, warning, silent, offline) and working hours, computed without any server."""

from __future__ import annotations

import dataclasses
import datetime
import zoneinfo

import pytest

from dicomfleet.dashboard import state, workinghours
from dicomfleet.dashboard.config import MachineSettings
from dicomfleet.dashboard.heartbeats import Heartbeat

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
# A Wednesday, 10:00 in Paris.
NOW = datetime.datetime(2024, 3, 13, 10, 0, tzinfo=PARIS)


def _machine(ingest: str = "agent", hours: str = "Mon-Fri 07:00-19:00", **changes) -> MachineSettings:
    machine = MachineSettings(
        id="ct1", ae_title="CT1", modality="CT", location="CT room 1", host="ct1", ingest=ingest,
        transport="rest", watch_folders=("/srv/export",), working_hours=workinghours.parse(hours),
        silent_after_s=7200.0, offline_after_s=120.0, heartbeat_interval_s=30.0, queue_warning_s=900.0,
        free_space_warning_bytes=2 * 1024**3, token_sha256="0" * 64)
    return dataclasses.replace(machine, **changes)


def _heartbeat(age_s: float = 10.0, **changes) -> Heartbeat:
    received = NOW - datetime.timedelta(seconds=age_s)
    heartbeat = Heartbeat(
        machine="ct1", received_at=received, remote_address="127.0.0.1", agent_version="0.1.0", agent_host="ct1",
        transport="rest", agent_state="sending", files_queued=0, files_sent_today=12, files_failed=0,
        files_quarantined=0, last_success_at=NOW - datetime.timedelta(minutes=5), last_error=None,
        last_error_at=None, oldest_queued_age_s=None, free_bytes=50 * 1024**3, sent_at=received,
        watch_folders={"/srv/export": {"exists": True, "free_bytes": 50 * 1024**3, "total_bytes": 100 * 1024**3}})
    return dataclasses.replace(heartbeat, **changes)


RECENT_STUDY = NOW - datetime.timedelta(minutes=20)


def test_judge_ok_with_fresh_heartbeat_and_recent_study():
    judgement = state.judge(_machine(), _heartbeat(), RECENT_STUDY, NOW)
    assert judgement.state == state.OK
    assert judgement.reasons == ()


def test_judge_offline_without_any_heartbeat():
    judgement = state.judge(_machine(), None, RECENT_STUDY, NOW)
    assert judgement.state == state.OFFLINE
    assert "no heartbeat received yet" in judgement.reasons


def test_judge_offline_after_threshold():
    judgement = state.judge(_machine(), _heartbeat(age_s=121), RECENT_STUDY, NOW)
    assert judgement.state == state.OFFLINE
    assert judgement.reasons[0] == "no heartbeat for 2 min"


def test_judge_warning_for_late_heartbeat():
    judgement = state.judge(_machine(), _heartbeat(age_s=90), RECENT_STUDY, NOW)
    assert judgement.state == state.WARNING
    assert judgement.reasons == ("heartbeat late: last one 1 min ago",)


@pytest.mark.parametrize("changes, reason", [
    ({"files_failed": 3}, "3 files failed and wait for a retry"),
    ({"files_quarantined": 2}, "2 files quarantined today"),
    ({"oldest_queued_age_s": 1800.0, "files_queued": 40}, "the oldest queued file waits for 30 min"),
    ({"agent_state": "credentials_rejected"}, "Orthanc rejects the machine's credentials; nothing is sent"),
    ({"agent_state": "orthanc_unreachable"}, "the agent cannot reach Orthanc; files wait in the queue"),
    ({"free_bytes": 1024**3}, "only 1.0 GB free in a watch folder"),
    ({"sent_at": NOW - datetime.timedelta(minutes=30)}, "the agent's clock is off by 29 min"),
])
def test_judge_warning_reasons(changes, reason):
    judgement = state.judge(_machine(), _heartbeat(**changes), RECENT_STUDY, NOW)
    assert judgement.state == state.WARNING
    assert judgement.reasons == (reason,)


def test_judge_quarantine_counts_only_today():
    heartbeat = _heartbeat(files_quarantined=5, quarantined_at_day_start=5)
    judgement = state.judge(_machine(), heartbeat, RECENT_STUDY, NOW)
    assert judgement.state == state.OK


def test_judge_silent_after_two_working_hours():
    old = NOW - datetime.timedelta(hours=3)
    heartbeat = _heartbeat(last_success_at=old)
    judgement = state.judge(_machine(), heartbeat, old, NOW)
    assert judgement.state == state.SILENT
    assert judgement.idle_working_s == pytest.approx(3 * 3600)


def test_judge_not_silent_overnight_gap():
    # Last image Tuesday 18:30; Wednesday 08:00 is only one working hour later.
    morning = datetime.datetime(2024, 3, 13, 8, 0, tzinfo=PARIS)
    last = datetime.datetime(2024, 3, 12, 18, 30, tzinfo=PARIS)
    heartbeat = dataclasses.replace(_heartbeat(), received_at=morning, sent_at=morning, last_success_at=last)
    judgement = state.judge(_machine(), heartbeat, last, morning)
    assert judgement.state == state.OK
    assert judgement.idle_working_s == pytest.approx(1.5 * 3600)


def test_judge_silent_when_nothing_ever_arrived():
    heartbeat = _heartbeat(last_success_at=None)
    judgement = state.judge(_machine(), heartbeat, None, NOW)
    assert judgement.state == state.SILENT
    assert judgement.reasons == ("no image received yet",)


def test_judge_never_hours_never_silent():
    heartbeat = _heartbeat(last_success_at=None)
    judgement = state.judge(_machine(hours="never"), heartbeat, None, NOW)
    assert judgement.state == state.OK


def test_judge_dicom_machine_needs_no_heartbeat():
    judgement = state.judge(_machine(ingest="dicom", token_sha256=""), None, RECENT_STUDY, NOW)
    assert judgement.state == state.OK


def test_judge_offline_outranks_silent():
    old = NOW - datetime.timedelta(hours=5)
    judgement = state.judge(_machine(), _heartbeat(age_s=3600, last_success_at=old), old, NOW)
    assert judgement.state == state.OFFLINE
    assert len(judgement.reasons) == 2


def test_judge_silent_outranks_warning():
    old = NOW - datetime.timedelta(hours=5)
    judgement = state.judge(_machine(), _heartbeat(files_failed=1, last_success_at=old), old, NOW)
    assert judgement.state == state.SILENT
    assert judgement.reasons[-1] == "1 files failed and wait for a retry"


def test_judge_bad_only_for_silent_and_offline():
    assert state.judge(_machine(), _heartbeat(files_failed=1), RECENT_STUDY, NOW).bad is False
    assert state.judge(_machine(), None, RECENT_STUDY, NOW).bad is True


@pytest.mark.parametrize("text, moment, inside", [
    ("Mon-Fri 07:00-19:00", datetime.datetime(2024, 3, 13, 7, 0, tzinfo=PARIS), True),
    ("Mon-Fri 07:00-19:00", datetime.datetime(2024, 3, 13, 19, 0, tzinfo=PARIS), False),
    ("Mon-Fri 07:00-19:00", datetime.datetime(2024, 3, 16, 10, 0, tzinfo=PARIS), False),
    ("Mon-Fri 07:00-19:00, Sat 08:00-12:00", datetime.datetime(2024, 3, 16, 10, 0, tzinfo=PARIS), True),
    ("daily 22:00-06:00", datetime.datetime(2024, 3, 14, 3, 0, tzinfo=PARIS), True),
    ("daily 22:00-06:00", datetime.datetime(2024, 3, 14, 12, 0, tzinfo=PARIS), False),
    ("Sat-Sun 00:00-24:00", datetime.datetime(2024, 3, 17, 23, 59, tzinfo=PARIS), True),
    ("always", datetime.datetime(2024, 3, 17, 3, 0, tzinfo=PARIS), True),
    ("never", datetime.datetime(2024, 3, 13, 10, 0, tzinfo=PARIS), False),
])
def test_working_hours_contains(text, moment, inside):
    assert workinghours.parse(text).contains(moment) is inside


def test_working_hours_seconds_over_weekend():
    hours = workinghours.parse("Mon-Fri 07:00-19:00")
    friday_evening = datetime.datetime(2024, 3, 15, 18, 0, tzinfo=PARIS)
    monday_morning = datetime.datetime(2024, 3, 18, 8, 0, tzinfo=PARIS)
    assert hours.seconds_between(friday_evening, monday_morning) == 2 * 3600


def test_working_hours_seconds_across_dst_change():
    # Paris moved its clocks forward at 02:00 on Sunday 2024-03-31; a night shift lost one hour.
    hours = workinghours.parse("daily 22:00-06:00")
    start = datetime.datetime(2024, 3, 30, 22, 0, tzinfo=PARIS)
    end = datetime.datetime(2024, 3, 31, 6, 0, tzinfo=PARIS)
    assert hours.seconds_between(start, end) == 7 * 3600


@pytest.mark.parametrize("text, message", [
    ("Mon-Fry 07:00-19:00", "'fry' is not a weekday"),
    ("Mon-Fri 7-19", "is not of the form"),
    ("Mon-Fri 07:00-25:00", "is not a time of day"),
    ("Mon 08:00-08:00", "starts and ends at the same time"),
    ("", "working hours must be a text"),
])
def test_working_hours_invalid(text, message):
    assert message in workinghours.problem(text)
