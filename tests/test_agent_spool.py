"""Unit tests of the agent's SQLite spool: identity, states, recovery after a crash, counts and pruning."""

from __future__ import annotations

import os
import sqlite3

import pytest

from dicomfleet.agent.spool import Spool, SpoolError


@pytest.fixture
def spool(tmp_path):
    spool = Spool(tmp_path / "state" / "spool.sqlite3")
    yield spool
    spool.close()


def test_spool_uses_write_ahead_log(tmp_path, spool):
    connection = sqlite3.connect(str(tmp_path / "state" / "spool.sqlite3"))
    mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    connection.close()

    assert mode == "wal"


def test_spool_identity_is_path_size_mtime(spool):
    first = spool.add("ct1", "/export/a.dcm", 100, 5, now=1000.0)

    assert first is not None
    assert spool.add("ct1", "/export/a.dcm", 100, 5, now=1001.0) is None
    assert spool.contains("/export/a.dcm", 100, 5) is True
    assert spool.contains("/export/a.dcm", 100, 6) is False
    assert spool.contains("/export/a.dcm", 101, 5) is False


def test_spool_rewritten_file_queued_again(spool):
    first = spool.add("ct1", "/export/a.dcm", 100, 5, now=1000.0)
    spool.mark_sent(first, "instance-1", now=1001.0)

    second = spool.add("ct1", "/export/a.dcm", 120, 9, now=1002.0)

    assert second is not None
    assert [(r.size, r.state) for r in spool.records()] == [(100, "sent"), (120, "queued")]


def test_spool_new_version_replaces_unsent_record(spool):
    spool.add("ct1", "/export/a.dcm", 100, 5, now=1000.0)

    spool.add("ct1", "/export/a.dcm", 200, 7, now=1001.0)

    assert [(r.size, r.state) for r in spool.records()] == [(200, "queued")]


def test_spool_claim_oldest_due_record(spool):
    spool.add("ct1", "/export/late.dcm", 1, 1, now=1000.0, not_before=1500.0)
    older = spool.add("ct1", "/export/old.dcm", 1, 1, now=1001.0)
    spool.add("mr1", "/mr/older.dcm", 1, 1, now=900.0)

    claimed = spool.claim(["ct1"], now=1002.0)

    assert claimed.id == older
    assert claimed.state == "sending"
    assert claimed.attempts == 1
    assert spool.claim(["ct1"], now=1002.0) is None
    assert spool.claim([], now=1002.0) is None
    assert spool.claim(["ct1"], now=1600.0).path == "/export/late.dcm"


def test_spool_recover_interrupted_requeues_sending(spool):
    record_id = spool.add("ct1", "/export/a.dcm", 1, 1, now=1000.0)
    spool.claim(["ct1"], now=1000.0)

    recovered = spool.recover_interrupted(now=2000.0)

    assert recovered == 1
    record = spool.get(record_id)
    assert record.state == "queued"
    assert record.next_attempt == 2000.0


def test_spool_survives_reopen_without_close(tmp_path):
    path = tmp_path / "spool.sqlite3"
    first = Spool(path)
    record_id = first.add("ct1", "/export/a.dcm", 10, 20)
    first.claim(["ct1"])
    # No close: the process died. A second connection must still see the committed records.
    second = Spool(path)

    assert second.recover_interrupted() == 1
    assert second.get(record_id).state == "queued"
    second.close()
    first._db.close()


def test_spool_failed_record_waits(spool):
    record_id = spool.add("ct1", "/export/a.dcm", 1, 1, now=1000.0)
    spool.claim(["ct1"], now=1000.0)

    spool.mark_failed(record_id, "connection refused", next_attempt=1010.0, now=1000.0)

    assert spool.claim(["ct1"], now=1005.0) is None
    assert spool.next_due(["ct1"]) == 1010.0
    retried = spool.claim(["ct1"], now=1010.0)
    assert retried.attempts == 2
    assert retried.last_error == "connection refused"


def test_spool_requeue_keeps_attempts(spool):
    record_id = spool.add("ct1", "/export/a.dcm", 1, 1, now=1000.0)
    spool.claim(["ct1"], now=1000.0)

    spool.requeue(record_id, next_attempt=1000.0, error="HTTP 401", now=1000.0)

    record = spool.get(record_id)
    assert record.state == "queued"
    assert record.attempts == 0
    assert record.last_error == "HTTP 401"


def test_spool_release_makes_backlog_due(spool):
    first = spool.add("ct1", "/export/a.dcm", 1, 1, now=1000.0)
    spool.claim(["ct1"], now=1000.0)
    spool.mark_failed(first, "down", next_attempt=1060.0, now=1000.0)
    spool.add("mr1", "/mr/b.dcm", 1, 1, now=1000.0, not_before=1060.0)

    released = spool.release("ct1", now=1001.0)

    assert released == 1
    assert spool.get(first).next_attempt == 1001.0
    assert spool.next_due(["mr1"]) == 1060.0


def test_spool_replace_identity_keeps_one_record(spool):
    record_id = spool.add("ct1", "/export/a.dcm", 100, 5, now=1000.0)

    new_id = spool.replace_identity(record_id, 150, 6, not_before=1005.0, now=1001.0)

    assert spool.get(record_id) is None
    assert spool.get(new_id).size == 150
    assert spool.get(new_id).next_attempt == 1005.0
    assert len(spool.records()) == 1


def test_spool_counts_per_machine(spool):
    sent = spool.add("ct1", "/export/sent.dcm", 1, 1, now=1000.0)
    spool.mark_sent(sent, "instance", now=5000.0)
    old = spool.add("ct1", "/export/old.dcm", 1, 1, now=1000.0)
    spool.mark_sent(old, "instance-old", now=100.0)
    bad = spool.add("ct1", "/export/bad.dcm", 1, 1, now=1000.0)
    spool.mark_quarantined(bad, "not DICOM", now=1000.0)
    failing = spool.add("ct1", "/export/failing.dcm", 1, 1, now=1500.0)
    spool.mark_failed(failing, "timeout", next_attempt=2000.0)
    spool.add("ct1", "/export/queued.dcm", 1, 1, now=1200.0)
    spool.add("mr1", "/mr/other.dcm", 1, 1, now=10.0)

    counts = spool.counts("ct1", day_start=4000.0)

    assert counts.queued == 1
    assert counts.failed == 1
    assert counts.quarantined == 1
    assert counts.sending == 0
    assert counts.sent_today == 1
    assert counts.oldest_pending_created_at == 1200.0
    assert counts.last_sent_at == 5000.0


def test_spool_counts_quarantined_today(spool):
    yesterday = spool.add("ct1", "/export/yesterday.dcm", 1, 1, now=1000.0)
    spool.mark_quarantined(yesterday, "not DICOM", now=1000.0)
    today = spool.add("ct1", "/export/today.dcm", 1, 1, now=1000.0)
    spool.mark_quarantined(today, "not DICOM", now=5000.0)

    counts = spool.counts("ct1", day_start=4000.0)

    assert counts.quarantined == 2
    assert counts.quarantined_today == 1


def test_spool_prune_keeps_existing_files(tmp_path, spool):
    existing = tmp_path / "kept.dcm"
    existing.write_bytes(b"x")
    present = spool.add("ct1", str(existing), 1, 1, now=1000.0)
    spool.mark_sent(present, "a", now=1000.0)
    vanished = spool.add("ct1", str(tmp_path / "gone.dcm"), 1, 1, now=1000.0)
    spool.mark_sent(vanished, "b", now=1000.0)
    recent = spool.add("ct1", str(tmp_path / "recent.dcm"), 1, 1, now=1000.0)
    spool.mark_sent(recent, "c", now=9000.0)
    queued = spool.add("ct1", str(tmp_path / "queued.dcm"), 1, 1, now=1000.0)

    removed = spool.prune_sent(sent_before=5000.0)

    assert removed == 1
    assert {r.id for r in spool.records()} == {present, recent, queued}


def test_spool_stores_non_utf8_paths(spool):
    path = os.fsdecode(b"/export/caf\xe9.dcm")

    record_id = spool.add("ct1", path, 1, 1)

    assert spool.get(record_id).path == path
    assert spool.contains(path, 1, 1) is True


def test_spool_rejects_unknown_schema_version(tmp_path):
    path = tmp_path / "future.sqlite3"
    connection = sqlite3.connect(str(path))
    connection.execute("PRAGMA user_version = 99")
    connection.close()

    with pytest.raises(SpoolError, match="schema version 99"):
        Spool(path)


VERSION_1_SCHEMA = """
CREATE TABLE files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine TEXT NOT NULL,
    path BLOB NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    state TEXT NOT NULL CHECK (state IN ('queued', 'sending', 'sent', 'failed', 'quarantined')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    instance_id TEXT,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sent_at REAL,
    UNIQUE (path, size, mtime_ns)
);
CREATE INDEX files_due ON files (next_attempt) WHERE state IN ('queued', 'failed');
CREATE INDEX files_by_machine ON files (machine, state, sent_at);
INSERT INTO files (machine, path, size, mtime_ns, state, next_attempt, instance_id, created_at, updated_at, sent_at)
    VALUES ('ct1', X'2f6578706f72742f612e64636d', 100, 5, 'sent', 1000, 'instance-1', 1000, 1001, 1001);
PRAGMA user_version = 1;
"""


def test_spool_migrates_version_1(tmp_path):
    path = tmp_path / "spool.sqlite3"
    connection = sqlite3.connect(str(path))
    connection.executescript(VERSION_1_SCHEMA)
    connection.close()

    spool = Spool(path)
    try:
        (record,) = spool.records()
        spool.mark_verified(record.id, now=1002.0)
        migrated = spool.get(record.id)
    finally:
        spool.close()

    assert record.path == "/export/a.dcm"
    assert record.instance_id == "instance-1"
    assert migrated.state == "verified"
    connection = sqlite3.connect(str(path))
    assert connection.execute("PRAGMA user_version").fetchone()[0] == 2
    connection.close()


def test_spool_verified_counts_as_sent(spool):
    record_id = spool.add("ct1", "/export/a.dcm", 100, 5, now=1000.0)
    spool.mark_sent(record_id, "instance-1", now=1001.0)

    assert [r.id for r in spool.sent_unverified(["ct1"])] == [record_id]
    spool.mark_verified(record_id, now=1002.0)
    counts = spool.counts("ct1", day_start=0.0)

    assert spool.sent_unverified(["ct1"]) == []
    assert counts.sent_today == 1
    assert counts.last_sent_at == 1001.0
    assert spool.prune_sent(2000.0, exists=lambda path: False) == 1
