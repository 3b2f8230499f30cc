"""The agent's durable spool: one SQLite record per file, committed before the file is sent.

A file is identified by its path, size and modification time, so a rewritten
file is sent again and an unchanged one never twice, even across restarts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

QUEUED = "queued"
SENDING = "sending"
SENT = "sent"
# Orthanc's stored copy matched the file's MD5 and the after-send policy (archive or delete) was applied.
VERIFIED = "verified"
FAILED = "failed"
QUARANTINED = "quarantined"
STATES = (QUEUED, SENDING, SENT, VERIFIED, FAILED, QUARANTINED)
# States of files that Orthanc has.
DONE_STATES = (SENT, VERIFIED)
# States whose files still have to reach Orthanc.
PENDING_STATES = (QUEUED, SENDING, FAILED)

# AUTOINCREMENT never reuses an id, so a record id in the log names one file for the spool's life.
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine TEXT NOT NULL,
    path BLOB NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    instance_id TEXT,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    UNIQUE (path, size, mtime_ns)
);
CREATE INDEX IF NOT EXISTS files_due ON files (next_attempt) WHERE state IN ('queued', 'failed');
CREATE INDEX IF NOT EXISTS files_by_machine ON files (machine, state, sent_at);
"""

# Version 1 lacked the state 'verified' in its CHECK constraint, which SQLite cannot alter in place.
_MIGRATE_FROM_1 = """
DROP INDEX IF EXISTS files_due;
DROP INDEX IF EXISTS files_by_machine;
ALTER TABLE files RENAME TO files_version_1;
""" + _SCHEMA + """
INSERT INTO files SELECT * FROM files_version_1;
DROP TABLE files_version_1;
"""

_COLUMNS = ("id, machine, path, size, mtime_ns, sha256, state, attempts, next_attempt, "
            "instance_id, last_error, created_at, updated_at, sent_at")


class SpoolError(Exception):
    """Raised when the spool database cannot be opened or has an unknown schema."""


@dataclasses.dataclass(frozen=True)
class SpoolRecord:
    """One file in the spool. Times are seconds since the epoch."""

    id: int
    machine: str
    path: str
    size: int
    mtime_ns: int
    sha256: str | None
    state: str
    attempts: int
    next_attempt: float
    instance_id: str | None
    last_error: str | None
    created_at: float
    updated_at: float
    sent_at: float | None


@dataclasses.dataclass
class MachineCounts:
    """The spool's counts for one machine, for the status file."""

    queued: int = 0
    sending: int = 0
    failed: int = 0
    quarantined: int = 0
    quarantined_today: int = 0
    sent_today: int = 0
    oldest_pending_created_at: float | None = None
    last_sent_at: float | None = None


def _record(row: tuple) -> SpoolRecord:
    values = list(row)
    values[2] = os.fsdecode(values[2])
    return SpoolRecord(*values)


class Spool:
    """The SQLite spool at PATH, shared by the agent's threads through one connection and a lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL keeps every commit through a crash of the agent; a power cut may lose the
            # latest ones. That loses no file: the rescan at start queues every file again, and
            # Orthanc returns AlreadyStored for one that was sent.
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                raise SpoolError(
                    f"The spool {self.path} has schema version {version}, but this agent reads version "
                    f"{SCHEMA_VERSION}; run the agent version that wrote it or move the spool aside.")
            if version == 1:
                self._db.executescript(f"BEGIN; {_MIGRATE_FROM_1} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
                log.info("Migrated the spool %s from schema version 1 to %d.", self.path, SCHEMA_VERSION)
            with self._db:
                self._db.executescript(_SCHEMA)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as error:
            raise SpoolError(f"Cannot open the spool {self.path}: {error}.") from error

    def close(self) -> None:
        """Checkpoint the write-ahead log and close the database."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as error:
                log.warning("Checkpointing the spool %s failed: %s", self.path, error)
            self._db.close()

    def recover_interrupted(self, now: float | None = None) -> int:
        """Put records left in ``sending`` by a stopped agent back in the queue; return how many.

        Resending such a file is safe because Orthanc returns AlreadyStored when
        the first attempt had stored it.
        """
        now = time.time() if now is None else now
        with self._lock, self._db:
            cursor = self._db.execute(
                "UPDATE files SET state = ?, next_attempt = ?, updated_at = ? WHERE state = ?",
                (QUEUED, now, now, SENDING))
            return cursor.rowcount

    def add(self, machine: str, path: str, size: int, mtime_ns: int, now: float | None = None,
            not_before: float | None = None) -> int | None:
        """Queue the file PATH with this size and mtime; return its record id, or None when already known.

        Unsent records of earlier versions of PATH are deleted: only the newest version is sent.
        """
        return self.add_many([(machine, path, size, mtime_ns)], now, not_before)[0]

    def add_many(self, files: list[tuple[str, str, int, int]], now: float | None = None,
                 not_before: float | None = None) -> list[int | None]:
        """Queue FILES, (machine, path, size, mtime_ns) each, in one transaction, as add() does one.

        Returns each file's record id, or None for a file already known. One commit for a
        scan's whole backlog instead of one per file.
        """
        now = time.time() if now is None else now
        next_attempt = now if not_before is None else not_before
        record_ids: list[int | None] = []
        with self._lock, self._db:
            for machine, path, size, mtime_ns in files:
                encoded = os.fsencode(path)
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO files (machine, path, size, mtime_ns, state, next_attempt, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (machine, encoded, size, mtime_ns, QUEUED, next_attempt, now, now))
                if cursor.rowcount == 0:
                    record_ids.append(None)
                    continue
                record_id = cursor.lastrowid
                # Earlier versions of the file that were never sent are superseded by this one.
                self._db.execute("DELETE FROM files WHERE path = ? AND id != ? AND state IN (?, ?)",
                                 (encoded, record_id, QUEUED, FAILED))
                record_ids.append(record_id)
        return record_ids

    def contains(self, path: str, size: int, mtime_ns: int) -> bool:
        """Return True when the spool has a record for PATH with this size and mtime, in any state."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM files WHERE path = ? AND size = ? AND mtime_ns = ?",
                (os.fsencode(path), size, mtime_ns)).fetchone()
        return row is not None

    def get(self, record_id: int) -> SpoolRecord | None:
        """Return the record RECORD_ID, or None when it no longer exists."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE id = ?", (record_id,)).fetchone()
        return _record(row) if row else None

    def claim(self, machines: Iterable[str], now: float | None = None) -> SpoolRecord | None:
        """Move the oldest due queued or failed record of MACHINES to ``sending`` and return it."""
        machines = list(machines)
        if not machines:
            return None

        now = time.time() if now is None else now
        marks = ", ".join("?" for _ in machines)
        with self._lock, self._db:
            row = self._db.execute(
                f"UPDATE files SET state = ?, attempts = attempts + 1, updated_at = ? WHERE id = ("
                f"  SELECT id FROM files WHERE state IN (?, ?) AND next_attempt <= ? AND machine IN ({marks})"
                f"  ORDER BY next_attempt, id LIMIT 1"
                f") RETURNING {_COLUMNS}",
                (SENDING, now, QUEUED, FAILED, now, *machines)).fetchone()
        return _record(row) if row else None

    def next_due(self, machines: Iterable[str]) -> float | None:
        """Return the earliest next attempt among queued and failed records of MACHINES, or None."""
        machines = list(machines)
        if not machines:
            return None

        marks = ", ".join("?" for _ in machines)
        with self._lock:
            row = self._db.execute(
                f"SELECT min(next_attempt) FROM files WHERE state IN (?, ?) AND machine IN ({marks})",
                (QUEUED, FAILED, *machines)).fetchone()
        return row[0]

    def mark_sent(self, record_id: int, instance_id: str, now: float | None = None,
                  sha256: str | None = None) -> None:
        """Record that Orthanc stored the file as INSTANCE_ID, with the SHA-256 of the content sent."""
        now = time.time() if now is None else now
        with self._lock, self._db:
            self._db.execute(
                "UPDATE files SET state = ?, instance_id = ?, sha256 = coalesce(?, sha256), last_error = NULL, "
                "sent_at = ?, updated_at = ? WHERE id = ?", (SENT, instance_id, sha256, now, now, record_id))

    def mark_verified(self, record_id: int, now: float | None = None, instance_id: str | None = None) -> None:
        """Record that Orthanc's copy of the sent file was verified and the after-send policy applied.

        INSTANCE_ID, when given, replaces the instance ID recorded when the file was sent.
        """
        now = time.time() if now is None else now
        with self._lock, self._db:
            self._db.execute("UPDATE files SET state = ?, instance_id = coalesce(?, instance_id), updated_at = ? "
                             "WHERE id = ? AND state = ?", (VERIFIED, instance_id, now, record_id, SENT))

    def sent_unverified(self, machines: Iterable[str]) -> list[SpoolRecord]:
        """Return the records of MACHINES that are sent but not verified, oldest first."""
        machines = list(machines)
        if not machines:
            return []
        marks = ", ".join("?" for _ in machines)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM files WHERE state = ? AND machine IN ({marks}) ORDER BY id",
                (SENT, *machines)).fetchall()
        return [_record(row) for row in rows]

    def mark_failed(self, record_id: int, error: str, next_attempt: float, now: float | None = None) -> None:
        """Record a failed attempt; the file is retried at NEXT_ATTEMPT."""
        now = time.time() if now is None else now
        with self._lock, self._db:
            self._db.execute(
                "UPDATE files SET state = ?, last_error = ?, next_attempt = ?, updated_at = ? WHERE id = ?",
                (FAILED, error, next_attempt, now, record_id))

    def requeue(self, record_id: int, next_attempt: float, error: str | None = None,
                now: float | None = None) -> None:
        """Put the record back in the queue without counting the attempt, to be tried at NEXT_ATTEMPT."""
        now = time.time() if now is None else now
        with self._lock, self._db:
            self._db.execute(
                "UPDATE files SET state = ?, attempts = max(attempts - 1, 0), last_error = ?, "
                "next_attempt = ?, updated_at = ? WHERE id = ?",
                (QUEUED, error, next_attempt, now, record_id))

    def mark_quarantined(self, record_id: int, reason: str, now: float | None = None) -> None:
        """Record that the file was moved to the quarantine folder for REASON."""
        now = time.time() if now is None else now
        with self._lock, self._db:
            self._db.execute(
                "UPDATE files SET state = ?, last_error = ?, updated_at = ? WHERE id = ?",
                (QUARANTINED, reason, now, record_id))

    def forget(self, record_id: int) -> None:
        """Delete the record, for a file that disappeared before it was sent."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM files WHERE id = ?", (record_id,))

    def replace_identity(self, record_id: int, size: int, mtime_ns: int, not_before: float,
                         now: float | None = None) -> int | None:
        """Replace an unsent record whose file changed by a new queued record; return the new id.

        Returns None when the spool already has a record for the new size and mtime.
        """
        now = time.time() if now is None else now
        with self._lock, self._db:
            row = self._db.execute("SELECT machine, path FROM files WHERE id = ?", (record_id,)).fetchone()
            if row is None:
                return None
            machine, path = row
            self._db.execute("DELETE FROM files WHERE id = ?", (record_id,))
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO files (machine, path, size, mtime_ns, state, next_attempt, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (machine, path, size, mtime_ns, QUEUED, not_before, now, now))
            if cursor.rowcount == 0:
                return None
            return cursor.lastrowid

    def release(self, machine: str, now: float | None = None) -> int:
        """Make every queued and failed record of MACHINE due now; return how many.

        Called when Orthanc accepts the machine's files again, so a backlog does
        not wait out each file's backoff.
        """
        now = time.time() if now is None else now
        with self._lock, self._db:
            cursor = self._db.execute(
                "UPDATE files SET next_attempt = ? WHERE machine = ? AND state IN (?, ?) AND next_attempt > ?",
                (now, machine, QUEUED, FAILED, now))
            return cursor.rowcount

    def counts(self, machine: str, day_start: float) -> MachineCounts:
        """Return MACHINE's counts; ``sent_today`` and ``quarantined_today`` count files since DAY_START."""
        counts = MachineCounts()
        with self._lock:
            for state, number in self._db.execute(
                    "SELECT state, count(*) FROM files WHERE machine = ? AND state NOT IN (?, ?) GROUP BY state",
                    (machine, *DONE_STATES)):
                setattr(counts, state, number)
            counts.sent_today = self._db.execute(
                "SELECT count(*) FROM files WHERE machine = ? AND state IN (?, ?) AND sent_at >= ?",
                (machine, *DONE_STATES, day_start)).fetchone()[0]
            counts.quarantined_today = self._db.execute(
                "SELECT count(*) FROM files WHERE machine = ? AND state = ? AND updated_at >= ?",
                (machine, QUARANTINED, day_start)).fetchone()[0]
            counts.oldest_pending_created_at = self._db.execute(
                "SELECT min(created_at) FROM files WHERE machine = ? AND state IN (?, ?, ?)",
                (machine, *PENDING_STATES)).fetchone()[0]
            counts.last_sent_at = self._db.execute(
                "SELECT max(sent_at) FROM files WHERE machine = ? AND state IN (?, ?)",
                (machine, *DONE_STATES)).fetchone()[0]
        return counts

    def records(self, machine: str | None = None) -> list[SpoolRecord]:
        """Return every record, or MACHINE's, in the order they were added."""
        with self._lock:
            if machine is None:
                rows = self._db.execute(f"SELECT {_COLUMNS} FROM files ORDER BY id").fetchall()
            else:
                rows = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE machine = ? ORDER BY id",
                                        (machine,)).fetchall()
        return [_record(row) for row in rows]

    def prune_sent(self, sent_before: float, exists: Callable[[str], bool] = os.path.lexists,
                   batch: int = 1000) -> int:
        """Delete records of files sent before SENT_BEFORE that no longer exist; return how many.

        A sent file that still exists keeps its record, or the next rescan would send it again.
        """
        removed = 0
        last_id = 0
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, path FROM files WHERE state IN (?, ?) AND sent_at < ? AND id > ? ORDER BY id LIMIT ?",
                    (*DONE_STATES, sent_before, last_id, batch)).fetchall()
            if not rows:
                return removed

            last_id = rows[-1][0]
            missing = [(record_id,) for record_id, path in rows if not exists(os.fsdecode(path))]
            if missing:
                with self._lock, self._db:
                    self._db.executemany("DELETE FROM files WHERE id = ? AND state IN ('sent', 'verified')", missing)
                removed += len(missing)
