"""Assemble the fleet view: one row per inventory machine, with its state, counts and heartbeat.

Machines that never reported are listed too. The fleet page, the JSON API,
``dicomfleet status`` and the metrics all read this one view.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from dicomfleet.dashboard import state as states
from dicomfleet.dashboard import timefmt
from dicomfleet.dashboard.config import DashboardConfig, MachineSettings
from dicomfleet.dashboard.heartbeats import Heartbeat
from dicomfleet.dashboard.orthanc import OrthancSnapshot
from dicomfleet.dashboard.studies import MachineActivity


@dataclasses.dataclass(frozen=True)
class MachineRow:
    """One machine on the fleet page."""

    machine: MachineSettings
    judgement: states.Judgement
    heartbeat: Heartbeat | None
    activity: MachineActivity

    def to_json(self) -> dict[str, Any]:
        """Return the row as the JSON API sends it; times are ISO 8601 in UTC."""
        heartbeat = self.heartbeat

        def iso(value: datetime.datetime | None) -> str | None:
            return value.astimezone(datetime.timezone.utc).isoformat() if value else None

        return {
            "id": self.machine.id,
            "state": self.judgement.state,
            "reasons": list(self.judgement.reasons),
            "location": self.machine.location,
            "ae_title": self.machine.ae_title,
            "modality": self.machine.modality,
            "ingest": self.machine.ingest,
            "transport": self.machine.transport,
            "working_hours": self.machine.working_hours.text,
            "in_working_hours": self.judgement.in_working_hours,
            "last_heartbeat_at": iso(heartbeat.received_at) if heartbeat else None,
            "last_study_at": iso(self.activity.last_study_at),
            "studies_today": self.activity.studies_today,
            "instances_today": self.activity.instances_today,
            "files_sent_today": heartbeat.files_sent_today if heartbeat else None,
            "files_queued": heartbeat.files_queued if heartbeat else None,
            "files_failed": heartbeat.files_failed if heartbeat else None,
            "files_quarantined": heartbeat.files_quarantined if heartbeat else None,
            "files_quarantined_today": heartbeat.quarantined_today if heartbeat else None,
            "oldest_queued_age_s": heartbeat.oldest_queued_age_s if heartbeat else None,
            "free_bytes": heartbeat.free_bytes if heartbeat else None,
            "last_error": heartbeat.last_error if heartbeat else None,
            "agent_version": heartbeat.agent_version if heartbeat else None,
            "agent_state": heartbeat.agent_state if heartbeat else None,
        }


@dataclasses.dataclass(frozen=True)
class FleetView:
    """Every machine's row at one moment, with the Orthanc panel."""

    site: str
    now: datetime.datetime
    rows: tuple[MachineRow, ...]
    orthanc: OrthancSnapshot
    # Studies whose source machine is not in the inventory, today.
    unattributed_studies_today: int
    # When the study counts were read from MongoDB; None when they never were.
    counted_at: datetime.datetime | None = None

    def count(self, state: str) -> int:
        """Return how many machines are in STATE."""
        return sum(1 for row in self.rows if row.judgement.state == state)

    @property
    def bad(self) -> bool:
        """True when any machine is silent or offline."""
        return any(row.judgement.bad for row in self.rows)

    def to_json(self) -> dict[str, Any]:
        """Return the view as the JSON API sends it."""
        orthanc = self.orthanc
        return {
            "site": self.site,
            "generated_at": self.now.astimezone(datetime.timezone.utc).isoformat(),
            "states": {state: self.count(state) for state in states.STATES},
            "machines": [row.to_json() for row in self.rows],
            "unattributed_studies_today": self.unattributed_studies_today,
            "counted_at": self.counted_at.astimezone(datetime.timezone.utc).isoformat() if self.counted_at else None,
            "orthanc": {
                "online": orthanc.online,
                "error": orthanc.error,
                "name": orthanc.name,
                "version": orthanc.version,
                "checked_at": orthanc.checked_at.isoformat() if orthanc.checked_at else None,
                "studies": orthanc.studies,
                "series": orthanc.series,
                "instances": orthanc.instances,
                "patients": orthanc.patients,
                "stored_bytes": orthanc.stored_bytes,
                "disk_path": orthanc.disk_path,
                "disk_total_bytes": orthanc.disk_total_bytes,
                "disk_free_bytes": orthanc.disk_free_bytes,
                "disk_used_percent": orthanc.disk_used_percent,
                "last_change": orthanc.last_change,
                "sync_checkpoint": orthanc.checkpoint_seq,
                "sync_lag_changes": orthanc.sync_lag,
                "sync_behind_s": orthanc.sync_behind_s,
            },
        }


def local_now(config: DashboardConfig) -> datetime.datetime:
    """Return the current time, aware, in the site's time zone."""
    return datetime.datetime.now(datetime.timezone.utc).astimezone(config.zone())


def day_start(now: datetime.datetime) -> datetime.datetime:
    """Return the midnight that began NOW's day, in NOW's time zone."""
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def build_view(config: DashboardConfig, heartbeats: dict[str, Heartbeat],
               activity: dict[str, MachineActivity], orthanc: OrthancSnapshot,
               now: datetime.datetime, counted_at: datetime.datetime | None = None) -> FleetView:
    """Return the fleet view at NOW from the latest HEARTBEATS, the studies' ACTIVITY and ORTHANC."""
    rows = []
    for machine in config.machines:
        heartbeat = heartbeats.get(machine.id)
        machine_activity = activity.get(machine.id, MachineActivity())
        judgement = states.judge(machine, heartbeat, machine_activity.last_study_at, now)
        rows.append(MachineRow(machine=machine, judgement=judgement, heartbeat=heartbeat,
                               activity=machine_activity))

    known = {machine.id for machine in config.machines}
    unattributed = sum(entry.studies_today for machine_id, entry in activity.items() if machine_id not in known)
    return FleetView(site=config.site, now=now, rows=tuple(rows), orthanc=orthanc,
                     unattributed_studies_today=unattributed, counted_at=counted_at)


def heartbeat_age(row: MachineRow, now: datetime.datetime) -> str:
    """Return how long ago ROW's machine sent its last heartbeat, for tables."""
    if row.heartbeat is None:
        return "never" if row.machine.sends_heartbeats else "no agent"
    return timefmt.duration((now - row.heartbeat.received_at).total_seconds()) + " ago"
