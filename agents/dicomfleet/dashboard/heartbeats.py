"""Check the heartbeats agents send and keep the latest one of each machine.

The latest heartbeat lives in memory, because this process receives every one.
A writer thread copies it to MongoDB's ``machine_heartbeats`` collection about
once a second. A restart therefore loses at most the last second, and a slow
MongoDB does not delay the agents' requests.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import threading
from typing import Any

import pymongo
import pymongo.errors

from dicomfleet.agent.repeats import RepeatedProblems
from dicomfleet.dashboard.config import DashboardConfig, MachineSettings

log = logging.getLogger(__name__)

COLLECTION = "machine_heartbeats"

# The agent's breaker states, as its status file writes them.
AGENT_STATES = ("sending", "orthanc_unreachable", "credentials_rejected")

MAX_TEXT = 2000
MAX_FOLDERS = 64
MAX_COUNT = 2**53
FLUSH_INTERVAL_S = 1.0


class HeartbeatRejected(Exception):
    """Raised when a heartbeat is not accepted; carries the HTTP status and a reason for the sender."""

    def __init__(self, status: int, reason: str, machine: str = ""):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.machine = machine


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """One accepted heartbeat: the agent's counters for one machine and when they arrived."""

    machine: str
    received_at: datetime.datetime
    remote_address: str
    agent_version: str
    agent_host: str
    transport: str
    agent_state: str
    files_queued: int
    files_sent_today: int
    files_failed: int
    files_quarantined: int
    last_success_at: datetime.datetime | None
    last_error: str | None
    last_error_at: datetime.datetime | None
    oldest_queued_age_s: float | None
    free_bytes: int | None
    sent_at: datetime.datetime | None
    watch_folders: dict[str, dict[str, Any]]
    # Files the agent quarantined since its host's day began, or None from an agent
    # that does not report it.
    reported_quarantined_today: int | None = None
    # files_quarantined when the site's day began, so the day's new quarantined files show.
    quarantined_at_day_start: int = 0
    day: str = ""

    @property
    def quarantined_today(self) -> int:
        """Files quarantined since the day began: the agent's own count, else the rise since the day's first heartbeat."""
        if self.reported_quarantined_today is not None:
            return self.reported_quarantined_today
        return max(0, self.files_quarantined - self.quarantined_at_day_start)

    def to_document(self) -> dict[str, Any]:
        """Return the MongoDB document of this heartbeat."""
        document = dataclasses.asdict(self)
        document["_id"] = document.pop("machine")
        return document

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> "Heartbeat":
        """Rebuild a heartbeat from its MongoDB document; times come back as aware UTC datetimes."""
        values = dict(document)
        values["machine"] = values.pop("_id")
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in values.items() if key in known}
        for key in ("received_at", "last_success_at", "last_error_at", "sent_at"):
            value = values.get(key)
            if isinstance(value, datetime.datetime) and value.tzinfo is None:
                values[key] = value.replace(tzinfo=datetime.timezone.utc)
        return cls(**values)


def token_digest(token: str) -> str:
    """Return the SHA-256 of a heartbeat token, as the dashboard's configuration stores it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_token(header: str | None) -> str | None:
    """Return the token of an ``Authorization: Bearer TOKEN`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_token(machine: MachineSettings, token: str | None) -> bool:
    """Return True when TOKEN is MACHINE's heartbeat token (compared in constant time)."""
    if not token or not machine.token_sha256:
        return False
    return hmac.compare_digest(token_digest(token), machine.token_sha256)


def _count(body: dict, key: str) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_COUNT:
        raise HeartbeatRejected(400, f"{key} must be a whole number, 0 or more, not {value!r:.40}")
    return value


def _optional_number(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < MAX_COUNT:
        raise HeartbeatRejected(400, f"{key} must be a number, 0 or more, or null, not {value!r:.40}")
    return float(value)


def _optional_text(body: dict, key: str, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise HeartbeatRejected(400, f"{key} must be a string of at most {MAX_TEXT} characters")
    return value


def _optional_time(body: dict, key: str) -> datetime.datetime | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise HeartbeatRejected(400, f"{key} must be an ISO 8601 time with its UTC offset, or null")
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise HeartbeatRejected(400, f"{key} must be an ISO 8601 time with its UTC offset, "
                                     f"not {value!r:.40}") from None
    if moment.tzinfo is None:
        raise HeartbeatRejected(400, f"{key} must carry its UTC offset, such as +01:00")
    return moment.astimezone(datetime.timezone.utc)


def _watch_folders(body: dict) -> tuple[dict[str, dict[str, Any]], int | None]:
    """Return the reported watch folders and the smallest free space among them."""
    value = body.get("watch_folders", {})
    if not isinstance(value, dict) or len(value) > MAX_FOLDERS:
        raise HeartbeatRejected(400, f"watch_folders must be an object of at most {MAX_FOLDERS} folders")

    folders: dict[str, dict[str, Any]] = {}
    smallest: int | None = None
    for path, entry in value.items():
        if len(path) > MAX_TEXT or not isinstance(entry, dict):
            raise HeartbeatRejected(400, "each watch_folders entry must map a path to an object")
        free = _optional_number(entry, "free_bytes")
        total = _optional_number(entry, "total_bytes")
        error = _optional_text(entry, "error")
        exists = entry.get("exists", True)
        if not isinstance(exists, bool):
            raise HeartbeatRejected(400, "watch_folders exists must be true or false")
        folders[path] = {"exists": exists, "free_bytes": None if free is None else int(free),
                         "total_bytes": None if total is None else int(total), "error": error}
        if free is not None and (smallest is None or free < smallest):
            smallest = int(free)
    return folders, smallest


def parse_heartbeat(machine: MachineSettings, raw: bytes, remote_address: str,
                    received_at: datetime.datetime) -> Heartbeat:
    """Check the JSON body RAW sent for MACHINE and return the heartbeat.

    Unknown keys are ignored, so a newer agent may send more. Raises
    HeartbeatRejected with status 400 for anything malformed.
    """
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HeartbeatRejected(400, f"the body is not UTF-8 JSON: {error}", machine.id) from None
    if not isinstance(body, dict):
        raise HeartbeatRejected(400, "the body must be a JSON object", machine.id)

    try:
        claimed = body.get("machine", machine.id)
        if claimed != machine.id:
            raise HeartbeatRejected(400, f"the body names machine {claimed!r:.40}, but the URL names {machine.id}")
        state = _optional_text(body, "state", required=True)
        if state not in AGENT_STATES:
            raise HeartbeatRejected(400, f"state must be one of {', '.join(AGENT_STATES)}, not {state!r:.40}")
        folders, smallest_free = _watch_folders(body)
        reported_free = body.get("free_bytes")
        free_bytes = smallest_free
        if reported_free is not None:
            free_bytes = int(_optional_number(body, "free_bytes"))

        return Heartbeat(
            machine=machine.id,
            received_at=received_at,
            remote_address=remote_address,
            agent_version=_optional_text(body, "agent_version", required=True) or "",
            agent_host=_optional_text(body, "host") or "",
            transport=_optional_text(body, "transport") or machine.transport,
            agent_state=state,
            files_queued=_count(body, "files_queued"),
            files_sent_today=_count(body, "files_sent_today"),
            files_failed=_count(body, "files_failed"),
            files_quarantined=_count(body, "files_quarantined"),
            reported_quarantined_today=(_count(body, "files_quarantined_today")
                                        if body.get("files_quarantined_today") is not None else None),
            last_success_at=_optional_time(body, "last_success_at"),
            last_error=_optional_text(body, "last_error"),
            last_error_at=_optional_time(body, "last_error_at"),
            oldest_queued_age_s=_optional_number(body, "oldest_queued_age_s"),
            free_bytes=free_bytes,
            sent_at=_optional_time(body, "sent_at"),
            watch_folders=folders,
        )
    except HeartbeatRejected as rejected:
        rejected.machine = machine.id
        raise


class HeartbeatBook:
    """The latest heartbeat of every machine, in memory and in MongoDB; thread-safe."""

    def __init__(self, config: DashboardConfig, database: pymongo.database.Database):
        self.config = config
        self.collection = database[COLLECTION]
        self._lock = threading.Lock()
        self._latest: dict[str, Heartbeat] = {}
        self._unsaved: set[str] = set()
        self._wakeup = threading.Event()
        self.accepted_total: dict[str, int] = {}
        self.rejected_total: dict[str, int] = {}
        self.problems = RepeatedProblems(log)
        self.thread: threading.Thread | None = None

    def load(self) -> int:
        """Read the stored heartbeats of the configured machines; return how many were found.

        MongoDB being down is logged and leaves the book empty until heartbeats arrive.
        """
        machine_ids = [machine.id for machine in self.config.machines]
        try:
            documents = list(self.collection.find({"_id": {"$in": machine_ids}}))
        except pymongo.errors.PyMongoError as error:
            log.warning("Cannot read the stored heartbeats from MongoDB (%s); machines show as not "
                        "reported until their next heartbeat.", error)
            return 0

        with self._lock:
            for document in documents:
                try:
                    heartbeat = Heartbeat.from_document(document)
                except (TypeError, ValueError) as error:
                    log.warning("Ignoring the stored heartbeat of machine %s: %s", document.get("_id"), error)
                    continue
                self._latest[heartbeat.machine] = heartbeat
        return len(documents)

    def latest(self) -> dict[str, Heartbeat]:
        """Return a copy of the latest heartbeat per machine id."""
        with self._lock:
            return dict(self._latest)

    def record(self, heartbeat: Heartbeat, day: str) -> Heartbeat:
        """Keep HEARTBEAT as its machine's latest; DAY is the site's date, which rolls the day's baseline.

        Returns the heartbeat as stored, with the quarantine baseline filled in.
        """
        with self._lock:
            previous = self._latest.get(heartbeat.machine)
            if previous is not None and previous.day == day:
                baseline = min(previous.quarantined_at_day_start, heartbeat.files_quarantined)
            elif previous is not None:
                baseline = min(previous.files_quarantined, heartbeat.files_quarantined)
            else:
                baseline = heartbeat.files_quarantined
            stored = dataclasses.replace(heartbeat, quarantined_at_day_start=baseline, day=day)
            self._latest[heartbeat.machine] = stored
            self._unsaved.add(heartbeat.machine)
            self.accepted_total[heartbeat.machine] = self.accepted_total.get(heartbeat.machine, 0) + 1
        self._wakeup.set()
        return stored

    def flush(self) -> int:
        """Write the heartbeats received since the last flush to MongoDB; return how many were written.

        On failure they stay unsaved for the next flush, and the problem is logged once.
        """
        with self._lock:
            machines = sorted(self._unsaved)
            self._unsaved.clear()
            documents = [self._latest[machine].to_document() for machine in machines]
        if not documents:
            return 0

        writes = [pymongo.ReplaceOne({"_id": document["_id"]}, document, upsert=True) for document in documents]
        try:
            self.collection.bulk_write(writes, ordered=False)
        except pymongo.errors.PyMongoError as error:
            with self._lock:
                self._unsaved.update(machines)
            self.problems.report("store", f"Cannot store heartbeats in MongoDB ({error}); keeping them in "
                                          "memory and retrying every second.")
            return 0
        self.problems.clear("store", "Heartbeats are stored in MongoDB again.")
        return len(documents)

    def start(self, stop: threading.Event) -> None:
        """Start the thread that flushes heartbeats to MongoDB until STOP is set, then flushes once more."""
        def run() -> None:
            while not stop.is_set():
                self._wakeup.wait(FLUSH_INTERVAL_S)
                self._wakeup.clear()
                self.flush()
                stop.wait(FLUSH_INTERVAL_S)
            self.flush()

        self.thread = threading.Thread(target=run, name="heartbeat-writer", daemon=True)
        self.thread.start()

    def count_rejection(self, reason: str) -> None:
        """Count one rejected heartbeat under REASON, for the metrics."""
        with self._lock:
            self.rejected_total[reason] = self.rejected_total.get(reason, 0) + 1
