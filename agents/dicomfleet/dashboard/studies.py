"""Read the sync's ``studies`` collection for the dashboard: per-machine counts and recent studies.

The fleet page costs one aggregation over the studies received since the
site's day began. Each machine's last study before that comes from a cache
that one full aggregation fills at start and refreshes every few hours.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from typing import Any

import pymongo
import pymongo.errors
from pymongo.database import Database

log = logging.getLogger(__name__)

STUDIES = "studies"

# Studies reach MongoDB a while after Orthanc received them (StableAge, sync
# lag), so the fleet page looks this far behind the cache's last full scan.
LATE_MARGIN = datetime.timedelta(hours=1)
FULL_SCAN_INTERVAL_S = 6 * 3600.0
# The full scan reads every record, so it may take far longer than one page's query.
FULL_SCAN_TIMEOUT_S = 900.0

RECENT_FIELDS = ("studyInstanceUID", "patientName", "patientID", "studyDate", "studyDescription",
                 "modalitiesInStudy", "modality", "instanceCount", "seriesCount", "sourceMachine",
                 "orthancStudyId", "lastReceivedAt", "firstReceivedAt", "remoteOrthancUrl")


@dataclasses.dataclass(frozen=True)
class MachineActivity:
    """A machine's studies as MongoDB records them."""

    studies_today: int = 0
    instances_today: int = 0
    last_study_at: datetime.datetime | None = None


def _aware(value: Any) -> datetime.datetime | None:
    if not isinstance(value, datetime.datetime):
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.timezone.utc)
    return value


class StudyIndex:
    """Queries on the ``studies`` records of one Orthanc source."""

    def __init__(self, database: Database, orthanc_name: str):
        self.collection = database[STUDIES]
        self.orthanc_name = orthanc_name
        self._lock = threading.Lock()
        self._last_study: dict[str, datetime.datetime] = {}
        self._scanned_at: datetime.datetime | None = None

    def ensure_indexes(self) -> None:
        """Create the index on lastReceivedAt that the fleet page's aggregation needs, if missing."""
        self.collection.create_index([("lastReceivedAt", -1)], name="last_received_at")

    def _base_filter(self) -> dict[str, Any]:
        return {"orthancName": self.orthanc_name, "deleted": {"$ne": True}}

    def scan_last_studies(self) -> int:
        """Refresh every machine's last study time with one full aggregation; return the machines found."""
        started = datetime.datetime.now(datetime.timezone.utc)
        pipeline = [
            {"$match": self._base_filter()},
            {"$group": {"_id": "$sourceMachine", "last": {"$max": "$lastReceivedAt"}}},
        ]
        found = {}
        with pymongo.timeout(FULL_SCAN_TIMEOUT_S):
            rows = list(self.collection.aggregate(pipeline))
        for row in rows:
            last = _aware(row.get("last"))
            if row["_id"] and last is not None:
                found[row["_id"]] = last
        with self._lock:
            self._last_study = found
            self._scanned_at = started
        return len(found)

    def window_start(self, day_start: datetime.datetime) -> datetime.datetime:
        """Return where the fleet aggregation starts: the day's start, or earlier to cover the cache's gap."""
        with self._lock:
            scanned_at = self._scanned_at
        if scanned_at is None:
            return day_start
        return min(day_start, scanned_at - LATE_MARGIN)

    def activity(self, day_start: datetime.datetime) -> dict[str, MachineActivity]:
        """Return each machine's studies and instances since DAY_START and its last study, in one aggregation."""
        since = self.window_start(day_start)
        is_today = {"$gte": ["$lastReceivedAt", day_start]}
        pipeline = [
            {"$match": {**self._base_filter(), "lastReceivedAt": {"$gte": since}}},
            {"$group": {
                "_id": "$sourceMachine",
                "studies": {"$sum": {"$cond": [is_today, 1, 0]}},
                "instances": {"$sum": {"$cond": [is_today, "$instanceCount", 0]}},
                "last": {"$max": "$lastReceivedAt"},
            }},
        ]
        rows = list(self.collection.aggregate(pipeline))

        with self._lock:
            cached = dict(self._last_study)
        result: dict[str, MachineActivity] = {}
        for machine_id, last in cached.items():
            result[machine_id] = MachineActivity(last_study_at=last)
        for row in rows:
            machine_id = row["_id"]
            if not machine_id:
                continue
            last = _aware(row.get("last"))
            previous = cached.get(machine_id)
            if previous is not None and (last is None or previous > last):
                last = previous
            result[machine_id] = MachineActivity(studies_today=int(row.get("studies") or 0),
                                                 instances_today=int(row.get("instances") or 0),
                                                 last_study_at=last)
        return result

    def recent(self, machine_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """Return MACHINE_ID's most recently received studies, newest first."""
        projection = {name: 1 for name in RECENT_FIELDS}
        cursor = self.collection.find({**self._base_filter(), "sourceMachine": machine_id}, projection)
        records = list(cursor.sort("lastReceivedAt", pymongo.DESCENDING).limit(limit))
        for record in records:
            record["lastReceivedAt"] = _aware(record.get("lastReceivedAt"))
        return records

    def find_study(self, orthanc_study_id: str) -> dict[str, Any] | None:
        """Return the record of the Orthanc study ORTHANC_STUDY_ID, or None."""
        return self.collection.find_one({"orthancName": self.orthanc_name, "orthancStudyId": orthanc_study_id},
                                        {name: 1 for name in RECENT_FIELDS})


class LastStudyScanner:
    """A thread that creates the study index, fills the last-study cache and refreshes it every few hours."""

    def __init__(self, index: StudyIndex, stop: threading.Event, interval_s: float = FULL_SCAN_INTERVAL_S):
        self.index = index
        self.stop = stop
        self.interval_s = interval_s
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="last-study-scan", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self.thread.start()

    def _run(self) -> None:
        try:
            with pymongo.timeout(FULL_SCAN_TIMEOUT_S):
                self.index.ensure_indexes()
        except pymongo.errors.PyMongoError as error:
            log.warning("Cannot create the studies index on lastReceivedAt (%s); the fleet page stays slow until "
                        "the dashboard restarts with MongoDB up.", error)

        while not self.stop.is_set():
            started = time.monotonic()
            try:
                machines = self.index.scan_last_studies()
            except pymongo.errors.PyMongoError as error:
                log.warning("Cannot scan the studies for each machine's last study (%s); retrying in 60 s.",
                            error)
                self.stop.wait(60)
                continue
            log.info("Scanned the last study of %d machines in %.1f s.", machines, time.monotonic() - started)
            self.ready.set()
            self.stop.wait(self.interval_s)
