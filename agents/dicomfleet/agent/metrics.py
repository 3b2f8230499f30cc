"""Export the agent's own counters as Prometheus metrics, read from the spool and the sender at each scrape.

The names differ from the dashboard's ``dicomfleet_agent_files_*`` series, which
come from heartbeats, so that the alert rules' one-series-per-machine matches
still hold when Prometheus scrapes both.
"""

from __future__ import annotations

import shutil
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from dicomfleet import __version__
from dicomfleet.agent.config import AgentConfig
from dicomfleet.agent.sender import Sender
from dicomfleet.agent.spool import Spool
from dicomfleet.agent.status import local_day_start

# The spool states reported by dicomfleet_agent_spool_files, as MachineCounts attributes.
SPOOL_STATES = ("queued", "sending", "failed", "quarantined")


class AgentCollector:
    """A prometheus_client collector of one agent's machines."""

    def __init__(self, config: AgentConfig, spool: Spool, sender: Sender):
        self.config = config
        self.spool = spool
        self.sender = sender

    def collect(self):
        """Yield every metric family for one scrape."""
        now = time.time()
        day_start = local_day_start(now)
        labels = ["machine"]

        spool_files = GaugeMetricFamily("dicomfleet_agent_spool_files",
                                        "Files in the agent's spool by state: queued, sending, failed "
                                        "(waiting for a retry) and quarantined.", labels=["machine", "state"])
        sent = CounterMetricFamily("dicomfleet_agent_sent_files",
                                   "Files stored in Orthanc, including AlreadyStored, since the agent started.",
                                   labels=labels)
        sent_bytes = CounterMetricFamily("dicomfleet_agent_sent_bytes",
                                         "Bytes of the files stored in Orthanc since the agent started.",
                                         labels=labels)
        sent_today = GaugeMetricFamily("dicomfleet_agent_sent_files_today",
                                       "Files sent since local midnight, from the spool.", labels=labels)
        oldest = GaugeMetricFamily("dicomfleet_agent_spool_oldest_queued_age_seconds",
                                   "Age of the oldest file waiting to be sent; 0 when none waits.", labels=labels)
        last_success = GaugeMetricFamily("dicomfleet_agent_last_success_timestamp_seconds",
                                         "When the machine's last file was stored in Orthanc (Unix time); "
                                         "absent until the first one.", labels=labels)
        free = GaugeMetricFamily("dicomfleet_agent_watch_folder_free_bytes",
                                 "Free bytes of the file system of each watch folder; absent while the folder "
                                 "cannot be read.", labels=["machine", "folder"])
        info = InfoMetricFamily("dicomfleet_agent_build", "The agent's version and the machine's transport.",
                                labels=labels)

        for machine in self.config.machines:
            counts = self.spool.counts(machine.id, day_start)
            activity = self.sender.activity[machine.id]
            for state in SPOOL_STATES:
                spool_files.add_metric([machine.id, state], getattr(counts, state))

            with activity.lock:
                sent.add_metric([machine.id], activity.files_sent)
                sent_bytes.add_metric([machine.id], activity.bytes_sent)
                last_success_at = activity.last_success_at or counts.last_sent_at
            sent_today.add_metric([machine.id], counts.sent_today)
            if last_success_at is not None:
                last_success.add_metric([machine.id], last_success_at)

            if counts.oldest_pending_created_at is None:
                oldest.add_metric([machine.id], 0.0)
            else:
                oldest.add_metric([machine.id], max(0.0, now - counts.oldest_pending_created_at))

            for folder in machine.watch_folders:
                try:
                    free.add_metric([machine.id, folder], shutil.disk_usage(folder).free)
                except OSError:
                    continue
            info.add_metric([machine.id], {"version": __version__, "transport": machine.transport})

        return [spool_files, sent, sent_bytes, sent_today, oldest, last_success, free, info]
