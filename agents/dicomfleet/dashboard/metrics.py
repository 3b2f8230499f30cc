"""Export the fleet as Prometheus metrics: agents (from their heartbeats), machines, Orthanc and the sync.

The agents and the sync report here, so one scrape of the dashboard's /metrics
gives every series the alert rules (templates/dicomfleet-alerts.yml.j2) use.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from dicomfleet import __version__
from dicomfleet.dashboard import state as states
from dicomfleet.dashboard.fleet import FleetView
from dicomfleet.dashboard.heartbeats import AGENT_STATES, HeartbeatBook


def _gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


class FleetCollector:
    """A prometheus_client collector that builds its metrics from a fresh fleet view at each scrape."""

    def __init__(self, view: Callable[[], FleetView], book: HeartbeatBook):
        self.view = view
        self.book = book

    def _machine_metrics(self, view: FleetView) -> list:
        labels = ("machine",)
        state = _gauge("dicomfleet_machine_state", "1 for the machine's current state (ok, warning, silent, "
                                                   "offline), 0 for the others.", ("machine", "state"))
        working = _gauge("dicomfleet_machine_in_working_hours", "1 while the machine is in its working hours.",
                         labels)
        idle = _gauge("dicomfleet_machine_idle_working_seconds", "Working-hour seconds since the machine's "
                                                                 "last study or file sent.", labels)
        last_study = _gauge("dicomfleet_machine_last_study_timestamp_seconds",
                            "When the machine's last study was received (Unix time).", labels)
        studies = _gauge("dicomfleet_machine_studies_today", "Studies received from the machine today.", labels)
        instances = _gauge("dicomfleet_machine_instances_today", "Instances in today's studies of the machine.",
                           labels)
        queue_limit = _gauge("dicomfleet_machine_queue_warning_seconds", "Age of the oldest queued file above "
                                                                         "which the machine is in warning.", labels)
        space_limit = _gauge("dicomfleet_machine_free_space_warning_bytes", "Free space of a watch folder below "
                                                                            "which the machine is in warning.", labels)
        for row in view.rows:
            machine = row.machine.id
            for name in states.STATES:
                state.add_metric([machine, name], 1.0 if row.judgement.state == name else 0.0)
            working.add_metric([machine], 1.0 if row.judgement.in_working_hours else 0.0)
            if row.judgement.idle_working_s is not None:
                idle.add_metric([machine], row.judgement.idle_working_s)
            if row.activity.last_study_at is not None:
                last_study.add_metric([machine], row.activity.last_study_at.timestamp())
            studies.add_metric([machine], row.activity.studies_today)
            instances.add_metric([machine], row.activity.instances_today)
            queue_limit.add_metric([machine], row.machine.queue_warning_s)
            space_limit.add_metric([machine], row.machine.free_space_warning_bytes)
        return [state, working, idle, last_study, studies, instances, queue_limit, space_limit]

    def _agent_metrics(self, view: FleetView) -> list:
        labels = ("machine",)
        last = _gauge("dicomfleet_agent_last_heartbeat_timestamp_seconds",
                      "When the dashboard received the machine's last heartbeat (Unix time).", labels)
        up = _gauge("dicomfleet_agent_up", "1 when the machine's agent sent a heartbeat within its offline "
                                           "threshold.", labels)
        queued = _gauge("dicomfleet_agent_files_queued", "Files waiting in the agent's spool.", labels)
        sent = _gauge("dicomfleet_agent_files_sent_today", "Files the agent sent today.", labels)
        failed = _gauge("dicomfleet_agent_files_failed", "Files that failed and wait for a retry.", labels)
        quarantined = _gauge("dicomfleet_agent_files_quarantined", "Files in the agent's quarantine.", labels)
        oldest = _gauge("dicomfleet_agent_oldest_queued_age_seconds", "Age of the oldest queued file.", labels)
        free = _gauge("dicomfleet_agent_free_bytes", "Smallest free space among the machine's watch folders.",
                      labels)
        agent_state = _gauge("dicomfleet_agent_state", "1 for the agent's sending state for the machine.",
                             ("machine", "state"))
        info = InfoMetricFamily("dicomfleet_agent", "The agent's version and host.",
                                labels=["machine"])

        for row in view.rows:
            if not row.machine.sends_heartbeats:
                continue
            machine = row.machine.id
            heartbeat = row.heartbeat
            if heartbeat is None:
                up.add_metric([machine], 0.0)
                continue
            age = (view.now - heartbeat.received_at).total_seconds()
            up.add_metric([machine], 1.0 if age <= row.machine.offline_after_s else 0.0)
            last.add_metric([machine], heartbeat.received_at.timestamp())
            queued.add_metric([machine], heartbeat.files_queued)
            sent.add_metric([machine], heartbeat.files_sent_today)
            failed.add_metric([machine], heartbeat.files_failed)
            quarantined.add_metric([machine], heartbeat.files_quarantined)
            if heartbeat.oldest_queued_age_s is not None:
                oldest.add_metric([machine], heartbeat.oldest_queued_age_s)
            if heartbeat.free_bytes is not None:
                free.add_metric([machine], heartbeat.free_bytes)
            for name in AGENT_STATES:
                agent_state.add_metric([machine, name], 1.0 if heartbeat.agent_state == name else 0.0)
            info.add_metric([machine], {"version": heartbeat.agent_version, "host": heartbeat.agent_host,
                                        "transport": heartbeat.transport})
        return [last, up, queued, sent, failed, quarantined, oldest, free, agent_state, info]

    def _orthanc_metrics(self, view: FleetView) -> list:
        orthanc = view.orthanc
        result = []
        up = _gauge("dicomfleet_orthanc_up", "1 when Orthanc answered the dashboard's last poll.")
        up.add_metric([], 1.0 if orthanc.online else 0.0)
        result.append(up)

        values = {
            "dicomfleet_orthanc_studies": ("Studies stored in Orthanc.", orthanc.studies),
            "dicomfleet_orthanc_instances": ("Instances stored in Orthanc.", orthanc.instances),
            "dicomfleet_orthanc_stored_bytes": ("Bytes of DICOM files Orthanc stores.", orthanc.stored_bytes),
            "dicomfleet_orthanc_disk_total_bytes": ("Size of the file system of Orthanc's storage.",
                                                    orthanc.disk_total_bytes),
            "dicomfleet_orthanc_disk_free_bytes": ("Free bytes on the file system of Orthanc's storage.",
                                                   orthanc.disk_free_bytes),
            "dicomfleet_orthanc_disk_used_ratio": ("Used share of the file system of Orthanc's storage, 0 to 1.",
                                                   None if orthanc.disk_used_percent is None
                                                   else orthanc.disk_used_percent / 100.0),
            "dicomfleet_orthanc_last_change_seq": ("Sequence number of the last change in Orthanc's feed.",
                                                   orthanc.last_change),
            "dicomfleet_sync_checkpoint_seq": ("The change the sync has written to MongoDB up to.",
                                               orthanc.checkpoint_seq),
            "dicomfleet_sync_lag_changes": ("Changes in Orthanc's feed the sync has not written yet.",
                                            orthanc.sync_lag),
            "dicomfleet_sync_behind_seconds": ("Seconds since the sync's checkpoint last moved while changes "
                                               "wait; 0 when it is caught up.", orthanc.sync_behind_s),
        }
        for name, (documentation, value) in values.items():
            if value is None:
                continue
            gauge = _gauge(name, documentation)
            gauge.add_metric([], float(value))
            result.append(gauge)
        return result

    def collect(self):
        """Yield every metric family for one scrape."""
        view = self.view()
        yield from self._machine_metrics(view)
        yield from self._agent_metrics(view)
        yield from self._orthanc_metrics(view)

        accepted = CounterMetricFamily("dicomfleet_dashboard_heartbeats_accepted",
                                       "Heartbeats accepted since the dashboard started.", labels=["machine"])
        for machine, count in sorted(self.book.accepted_total.items()):
            accepted.add_metric([machine], count)
        yield accepted
        rejected = CounterMetricFamily("dicomfleet_dashboard_heartbeats_rejected",
                                       "Heartbeats rejected since the dashboard started, by reason.",
                                       labels=["reason"])
        for reason, count in sorted(self.book.rejected_total.items()):
            rejected.add_metric([reason], count)
        yield rejected

        info = InfoMetricFamily("dicomfleet_dashboard", "The dashboard's version and site.")
        info.add_metric([], {"version": __version__, "site": view.site})
        yield info


def render_metrics(view: Callable[[], FleetView], book: HeartbeatBook) -> bytes:
    """Return the Prometheus text exposition of the fleet."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(view, book))
    return generate_latest(registry)
