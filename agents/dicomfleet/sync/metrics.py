"""Count what the sync does and export it as Prometheus metrics at each scrape.

The names differ from the dashboard's ``dicomfleet_sync_checkpoint_seq`` and
``dicomfleet_sync_lag_changes``, which the dashboard reads from MongoDB, so that
both can be scraped without two series of one name meaning different things.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from dicomfleet import __version__

if TYPE_CHECKING:
    from dicomfleet.sync.context import SyncContext
    from dicomfleet.sync.reconcile import ReconcileReport


@dataclasses.dataclass
class SyncStats:
    """The sync's progress since it started, updated by the change follower, the updater and reconcile."""

    checkpoint_seq: int | None = None
    # The newest change of Orthanc's feed (its Last field), from the latest /changes response.
    orthanc_last_seq: int | None = None
    # Study records created, updated, marked deleted or removed.
    records_written: int = 0
    # When the latest page of changes was read and written (Unix time).
    last_cycle_at: float | None = None
    reconcile_runs: int = 0
    # The differences of the latest reconcile: missing in MongoDB, missing in Orthanc, differing.
    reconcile_missing: int | None = None
    reconcile_extra: int | None = None
    reconcile_differing: int | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def count_record_written(self) -> None:
        """Count one study record created, updated, marked deleted or removed."""
        with self.lock:
            self.records_written += 1

    def note_reconcile(self, report: ReconcileReport) -> None:
        """Count a finished reconcile and keep its differences."""
        with self.lock:
            self.reconcile_runs += 1
            self.reconcile_missing = len(report.missing_in_mongodb)
            self.reconcile_extra = len(report.missing_in_orthanc)
            self.reconcile_differing = len(report.mismatches)


class SyncCollector:
    """A prometheus_client collector of one sync, labelled with its Orthanc source name."""

    def __init__(self, context: SyncContext):
        self.context = context

    def _orthanc_up(self) -> float:
        """Return 1 when the latest call to Orthanc succeeded, 0 when it failed or none was made yet."""
        outage = self.context.orthanc_outage
        return 1.0 if outage.down_since is None and outage.last_success_at is not None else 0.0

    def _mongodb_up(self) -> float:
        """Return 1 when pymongo's background monitor has found a writable MongoDB server."""
        description = self.context.mongo_client.topology_description
        return 1.0 if description.has_writable_server() else 0.0

    def collect(self):
        """Yield every metric family for one scrape."""
        stats = self.context.stats
        source = self.context.config.orthanc.name
        labels = ["orthanc"]
        with stats.lock:
            snapshot = dataclasses.replace(stats, lock=threading.Lock())

        gauges = {
            "dicomfleet_sync_feed_checkpoint_seq": (
                "The change of Orthanc's feed the sync has written to MongoDB up to.", snapshot.checkpoint_seq),
            "dicomfleet_sync_feed_last_seq": (
                "The last change of Orthanc's feed, from the sync's latest /changes request.",
                snapshot.orthanc_last_seq),
            "dicomfleet_sync_last_cycle_timestamp_seconds": (
                "When the sync last read and wrote a page of changes (Unix time).", snapshot.last_cycle_at),
            "dicomfleet_sync_orthanc_up": (
                "1 when the sync's latest request to Orthanc succeeded.", self._orthanc_up()),
            "dicomfleet_sync_mongodb_up": (
                "1 when pymongo's monitor reaches a writable MongoDB server.", self._mongodb_up()),
        }
        if snapshot.checkpoint_seq is not None and snapshot.orthanc_last_seq is not None:
            lag = max(0, snapshot.orthanc_last_seq - snapshot.checkpoint_seq)
            gauges["dicomfleet_sync_feed_lag_changes"] = (
                "Changes in Orthanc's feed after the sync's checkpoint.", lag)

        for name, (documentation, value) in gauges.items():
            gauge = GaugeMetricFamily(name, documentation, labels=labels)
            if value is not None:
                gauge.add_metric([source], value)
            yield gauge

        records = CounterMetricFamily("dicomfleet_sync_records_written",
                                      "Study records created, updated, marked deleted or removed since the "
                                      "sync started.", labels=labels)
        records.add_metric([source], snapshot.records_written)
        yield records

        runs = CounterMetricFamily("dicomfleet_sync_reconcile_runs",
                                   "Reconciles finished since the sync started.", labels=labels)
        runs.add_metric([source], snapshot.reconcile_runs)
        yield runs

        differences = GaugeMetricFamily("dicomfleet_sync_reconcile_last_differences",
                                        "Studies the latest reconcile found missing in MongoDB (missing), "
                                        "missing in Orthanc (extra) or differing, before its repairs.",
                                        labels=["orthanc", "kind"])
        if snapshot.reconcile_runs:
            differences.add_metric([source, "missing"], snapshot.reconcile_missing)
            differences.add_metric([source, "extra"], snapshot.reconcile_extra)
            differences.add_metric([source, "differing"], snapshot.reconcile_differing)
        yield differences

        info = InfoMetricFamily("dicomfleet_sync_build", "The sync's version.", labels=labels)
        info.add_metric([source], {"version": __version__})
        yield info
