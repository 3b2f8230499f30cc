"""Watch the Orthanc server and the sync from the dashboard, and fetch study thumbnails.

A thread polls Orthanc's /system, /statistics and change feed, the storage
disk and the sync's checkpoint every few seconds, so the fleet page does not
wait on Orthanc. Thumbnails are Orthanc's /instances/{id}/preview, fetched
with the dashboard's own Orthanc user and kept in a bounded cache.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import os
import re
import shutil
import threading
import time
from typing import Any

import pymongo.errors
import requests
from pymongo.database import Database

from dicomfleet.agent.repeats import RepeatedProblems
from dicomfleet.dashboard.config import OrthancSettings

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 10.0
REQUEST_TIMEOUT_S = 5.0
CHECKPOINTS = "sync_checkpoints"

# Orthanc's resource ids are SHA-1 digests written as five groups of eight hex digits.
ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")

# Series without pixel data of their own (DICOM PS3.3 C.7.3.1.1.1 defined terms).
NON_IMAGE_MODALITIES = frozenset({"PR", "SR", "KO", "DOC", "REG", "SEG", "RTSTRUCT", "RTPLAN", "RTRECORD"})


class PreviewUnavailable(Exception):
    """Raised when Orthanc cannot render a thumbnail of a study."""


@dataclasses.dataclass(frozen=True)
class OrthancSnapshot:
    """The dashboard's latest reading of Orthanc, its storage disk and the sync's checkpoint."""

    checked_at: datetime.datetime | None = None
    online: bool = False
    error: str | None = None
    name: str = ""
    version: str = ""
    studies: int | None = None
    series: int | None = None
    instances: int | None = None
    patients: int | None = None
    stored_bytes: int | None = None
    disk_path: str = ""
    disk_total_bytes: int | None = None
    disk_free_bytes: int | None = None
    last_change: int | None = None
    checkpoint_seq: int | None = None
    checkpoint_updated_at: datetime.datetime | None = None

    @property
    def disk_used_percent(self) -> float | None:
        """Percent of the storage disk in use."""
        if not self.disk_total_bytes or self.disk_free_bytes is None:
            return None
        return 100.0 * (self.disk_total_bytes - self.disk_free_bytes) / self.disk_total_bytes

    @property
    def sync_lag(self) -> int | None:
        """Changes in Orthanc's feed that the sync has not written yet."""
        if self.last_change is None or self.checkpoint_seq is None:
            return None
        return max(0, self.last_change - self.checkpoint_seq)

    @property
    def sync_behind_s(self) -> float | None:
        """Seconds since the sync's checkpoint last moved while changes wait; 0 when it is caught up."""
        lag = self.sync_lag
        if lag is None or self.checked_at is None:
            return None
        if lag == 0 or self.checkpoint_updated_at is None:
            return 0.0
        return max(0.0, (self.checked_at - self.checkpoint_updated_at).total_seconds())


def disk_usage(path: str) -> tuple[str, int, int] | None:
    """Return (path measured, total bytes, free bytes) of PATH's file system.

    When PATH cannot be reached (for example Orthanc's folder is closed to the
    dashboard's user), the nearest parent folder that can is measured instead.
    """
    candidate = os.path.abspath(path)
    while True:
        try:
            usage = shutil.disk_usage(candidate)
            return candidate, usage.total, usage.free
        except OSError:
            parent = os.path.dirname(candidate)
            if parent == candidate:
                return None
            candidate = parent


class OrthancClient:
    """Orthanc's REST API as the dashboard's user; one keep-alive session per thread."""

    def __init__(self, settings: OrthancSettings, password: str):
        self.settings = settings
        self.auth = (settings.username, password)
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.auth = self.auth
            self._local.session = session
        return session

    def get(self, path: str, **params: Any) -> requests.Response:
        """GET PATH and return the response; raises requests' errors for failures."""
        answer = self._session().get(self.settings.url + path, params=params or None, timeout=REQUEST_TIMEOUT_S)
        answer.raise_for_status()
        return answer

    def json(self, path: str, **params: Any) -> Any:
        """GET PATH and return its decoded JSON."""
        return self.get(path, **params).json()


class PreviewCache:
    """Thumbnails of studies, fetched from Orthanc once and kept up to MAX_ENTRIES; thread-safe."""

    MAX_ENTRIES = 512

    def __init__(self, client: OrthancClient):
        self.client = client
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def _pick_instance(self, study_id: str) -> str:
        series = self.client.json(f"/studies/{study_id}/series")
        if not series:
            raise PreviewUnavailable(f"study {study_id} has no series left")

        def rank(entry: dict) -> tuple[bool, int]:
            modality = entry.get("MainDicomTags", {}).get("Modality", "")
            return (modality not in NON_IMAGE_MODALITIES, len(entry.get("Instances", [])))

        chosen = max(series, key=rank)
        instances = chosen.get("Instances", [])
        if not instances:
            raise PreviewUnavailable(f"series {chosen.get('ID')} of study {study_id} has no instance")
        return instances[len(instances) // 2]

    def preview(self, study_id: str) -> bytes:
        """Return a PNG of one image of the Orthanc study STUDY_ID.

        Raises PreviewUnavailable when the id is malformed, the study is gone
        or Orthanc cannot render the image (for example a compression it lacks).
        """
        if not ORTHANC_ID.match(study_id):
            raise PreviewUnavailable(f"{study_id!r:.80} is not an Orthanc study id")
        with self._lock:
            cached = self._entries.get(study_id)
            if cached is not None:
                self._entries.move_to_end(study_id)
                return cached

        try:
            instance_id = self._pick_instance(study_id)
            image = self.client.get(f"/instances/{instance_id}/preview").content
        except requests.RequestException as error:
            log.info("No thumbnail for Orthanc study %s: %s", study_id, error)
            raise PreviewUnavailable(f"Orthanc could not render study {study_id}: {error}") from error

        with self._lock:
            self._entries[study_id] = image
            while len(self._entries) > self.MAX_ENTRIES:
                self._entries.popitem(last=False)
        return image


class OrthancWatch:
    """A thread that refreshes an OrthancSnapshot every POLL_INTERVAL_S seconds."""

    def __init__(self, client: OrthancClient, database: Database, stop: threading.Event,
                 interval_s: float = POLL_INTERVAL_S):
        self.client = client
        self.settings = client.settings
        self.checkpoints = database[CHECKPOINTS]
        self.stop = stop
        self.interval_s = interval_s
        self.problems = RepeatedProblems(log)
        self._lock = threading.Lock()
        self._snapshot = OrthancSnapshot()
        self.thread = threading.Thread(target=self._run, name="orthanc-watch", daemon=True)

    def snapshot(self) -> OrthancSnapshot:
        """Return the latest snapshot."""
        with self._lock:
            return self._snapshot

    def start(self) -> None:
        """Take the first snapshot now, then start the thread."""
        self.refresh()
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.refresh()

    def _orthanc_values(self) -> dict[str, Any]:
        system = self.client.json("/system")
        statistics = self.client.json("/statistics")
        changes = self.client.json("/changes", last="")
        return {
            "online": True,
            "name": str(system.get("Name", "")),
            "version": str(system.get("Version", "")),
            "studies": int(statistics.get("CountStudies", 0)),
            "series": int(statistics.get("CountSeries", 0)),
            "instances": int(statistics.get("CountInstances", 0)),
            "patients": int(statistics.get("CountPatients", 0)),
            "stored_bytes": int(statistics.get("TotalDiskSize", 0)),
            "last_change": int(changes.get("Last", 0)),
        }

    def _checkpoint_values(self) -> dict[str, Any]:
        document = self.checkpoints.find_one({"_id": self.settings.name})
        if document is None:
            return {"checkpoint_seq": 0, "checkpoint_updated_at": None}
        updated = document.get("updatedAt")
        if isinstance(updated, datetime.datetime) and updated.tzinfo is None:
            updated = updated.replace(tzinfo=datetime.timezone.utc)
        return {"checkpoint_seq": int(document.get("seq", 0)), "checkpoint_updated_at": updated}

    def refresh(self) -> OrthancSnapshot:
        """Take a new snapshot now and return it; failures are logged once and shown in the snapshot."""
        started = time.monotonic()
        values: dict[str, Any] = {"checked_at": datetime.datetime.now(datetime.timezone.utc)}

        try:
            values.update(self._orthanc_values())
        except (requests.RequestException, ValueError) as error:
            values["error"] = f"Orthanc at {self.settings.url} does not answer: {error}"
            self.problems.report("orthanc", values["error"])
        else:
            self.problems.clear("orthanc", f"Orthanc at {self.settings.url} answers again.")

        try:
            values.update(self._checkpoint_values())
        except pymongo.errors.PyMongoError as error:
            self.problems.report("checkpoint", f"Cannot read the sync's checkpoint from MongoDB: {error}")
        else:
            self.problems.clear("checkpoint", "The sync's checkpoint is readable again.")

        if self.settings.storage_directory:
            measured = disk_usage(self.settings.storage_directory)
            if measured is not None:
                values["disk_path"], values["disk_total_bytes"], values["disk_free_bytes"] = measured

        snapshot = OrthancSnapshot(**values)
        with self._lock:
            self._snapshot = snapshot
        log.debug("Orthanc snapshot taken in %.3f s.", time.monotonic() - started)
        return snapshot
