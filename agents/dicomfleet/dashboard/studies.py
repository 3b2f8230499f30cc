"""Read the sync's ``studies`` collection for the dashboard: per-machine counts and recent studies.

The fleet page costs one aggregation over the studies received since the
site's day began. Each machine's last study before that comes from a cache,
kept in MongoDB's ``dashboard_state`` so a restart does not rescan every record.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
import time
from typing import Any, Callable

import pymongo
import pymongo.errors
from pymongo.database import Database

from dicomfleet.agent.repeats import RepeatedProblems

log = logging.getLogger(__name__)

STUDIES = "studies"
STATE = "dashboard_state"

# Studies reach MongoDB a while after Orthanc received them (StableAge, sync
# lag), so each scan and the fleet page look this far behind the last scan.
LATE_MARGIN = datetime.timedelta(hours=1)
SCAN_INTERVAL_S = 600.0
# The first scan reads every record, so it may take far longer than one page's query.
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
        self.state = database[STATE]
        self.orthanc_name = orthanc_name
        self._lock = threading.Lock()
        self._last_study: dict[str, datetime.datetime] = {}
        self._scanned_at: datetime.datetime | None = None

    def ensure_indexes(self) -> None:
        """Create the index on lastReceivedAt that the fleet page's aggregation needs, if missing."""
        self.collection.create_index([("lastReceivedAt", -1)], name="last_received_at")

    def _base_filter(self) -> dict[str, Any]:
        return {"orthancName": self.orthanc_name, "deleted": {"$ne": True}}

    @property
    def _state_id(self) -> str:
        return f"last-studies:{self.orthanc_name}"

    def load_last_studies(self) -> bool:
        """Load the cache the last scan stored; return False when there is none."""
        document = self.state.find_one({"_id": self._state_id})
        if document is None or not isinstance(document.get("machines"), dict):
            return False
        found = {machine: _aware(value) for machine, value in document["machines"].items()}
        with self._lock:
            self._last_study = {machine: value for machine, value in found.items() if value is not None}
            self._scanned_at = _aware(document.get("scannedAt"))
        return True

    def scan_last_studies(self, full: bool = False) -> int:
        """Update every machine's last study time with one aggregation and store the cache; return its size.

        A FULL scan reads every record; otherwise only the records received
        since the previous scan, less LATE_MARGIN, are read.
        """
        started = datetime.datetime.now(datetime.timezone.utc)
        match = self._base_filter()
        with self._lock:
            scanned_at = self._scanned_at
        if not full and scanned_at is not None:
            match["lastReceivedAt"] = {"$gte": scanned_at - LATE_MARGIN}
        pipeline = [
            {"$match": match},
            {"$group": {"_id": "$sourceMachine", "last": {"$max": "$lastReceivedAt"}}},
        ]
        with pymongo.timeout(FULL_SCAN_TIMEOUT_S):
            rows = list(self.collection.aggregate(pipeline))

        with self._lock:
            # NOTE: a scan only moves times forward, so deleting a machine's newest study keeps its time.
            found = {} if full else dict(self._last_study)
            for row in rows:
                last = _aware(row.get("last"))
                if row["_id"] and last is not None and (row["_id"] not in found or last > found[row["_id"]]):
                    found[row["_id"]] = last
            self._last_study = found
            self._scanned_at = started
        self.state.replace_one({"_id": self._state_id},
                               {"scannedAt": started, "machines": found}, upsert=True)
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


@dataclasses.dataclass(frozen=True)
class ActivitySnapshot:
    """Every machine's activity at one moment, or why it could not be read."""

    activity: dict[str, MachineActivity]
    taken_at: datetime.datetime | None
    error: str | None = None


class ActivityWatch:
    """A thread that runs the per-machine activity aggregation every INTERVAL_S seconds.

    The fleet page, the JSON API and the metrics read its latest snapshot, so
    they run no study query of their own. The aggregation's cost therefore does
    not grow with the number of viewers.
    """

    def __init__(self, index: StudyIndex, day_start: Callable[[], datetime.datetime], stop: threading.Event,
                 interval_s: float):
        self.index = index
        self.day_start = day_start
        self.stop = stop
        self.interval_s = interval_s
        self.last_duration_s: float | None = None
        self.problems = RepeatedProblems(log)
        self._lock = threading.Lock()
        self._snapshot = ActivitySnapshot(activity={}, taken_at=None, error="study counts are not read yet")
        self.thread = threading.Thread(target=self._run, name="activity-watch", daemon=True)

    def snapshot(self) -> ActivitySnapshot:
        """Return the latest snapshot."""
        with self._lock:
            return self._snapshot

    def start(self) -> None:
        """Start the thread; its first snapshot follows at once."""
        self.thread.start()

    def refresh(self) -> ActivitySnapshot:
        """Run the aggregation now and keep its result; a failure keeps the previous counts with the error."""
        started = time.monotonic()
        taken_at = datetime.datetime.now(datetime.timezone.utc)
        try:
            activity = self.index.activity(self.day_start())
        except pymongo.errors.PyMongoError as error:
            with self._lock:
                previous = self._snapshot
                self._snapshot = ActivitySnapshot(previous.activity, previous.taken_at,
                                                  f"MongoDB does not answer, so study counts are not current: {error}")
                return self._snapshot

        snapshot = ActivitySnapshot(activity=activity, taken_at=taken_at)
        with self._lock:
            self._snapshot = snapshot
        self.last_duration_s = time.monotonic() - started
        return snapshot

    def _run(self) -> None:
        while not self.stop.is_set():
            snapshot = self.refresh()
            if snapshot.error:
                self.problems.report("activity", snapshot.error)
            else:
                self.problems.clear("activity", "MongoDB answers the study counts' aggregation again.")
            self.stop.wait(self.interval_s)


class LastStudyScanner:
    """A thread that creates the study index, fills the last-study cache and refreshes it every few minutes."""

    def __init__(self, index: StudyIndex, stop: threading.Event, interval_s: float = SCAN_INTERVAL_S):
        self.index = index
        self.stop = stop
        self.interval_s = interval_s
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="last-study-scan", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self.thread.start()

    def _prepare(self) -> bool:
        """Create the index and load the stored cache; return True when a full scan is needed."""
        with pymongo.timeout(FULL_SCAN_TIMEOUT_S):
            self.index.ensure_indexes()
        return not self.index.load_last_studies()

    def _run(self) -> None:
        full = None
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                if full is None:
                    full = self._prepare()
                machines = self.index.scan_last_studies(full=full)
            except pymongo.errors.PyMongoError as error:
                log.warning("Cannot scan the studies for each machine's last study (%s); retrying in 60 s.",
                            error)
                self.stop.wait(60)
                continue
            log.info("Scanned the last study of %d machines (%s) in %.1f s.", machines,
                     "every record" if full else "recent records", time.monotonic() - started)
            full = False
            self.ready.set()
            self.stop.wait(self.interval_s)
