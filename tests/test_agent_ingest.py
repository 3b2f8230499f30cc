"""End-to-end tests of the agent: files dropped in a watch folder reach a real Orthanc once each.

The agent runs as a subprocess with a configuration rendered from the project's
template; Orthanc is the Debian binary started by dicomfleet.localservers.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from agent_support import MACHINE_ID, PYDICOM_FILES, AgentSite, make_instance, md5, sop_instance_uid, wait_until


@pytest.fixture(scope="module")
def agent_site(tmp_path_factory):
    # A rescan every second makes rescans race with inotify events in every test.
    site = AgentSite(tmp_path_factory.mktemp("agent-ingest"), {"dicomfleet_agent_rescan_interval_s": 1})
    site.orthanc.start()
    yield site
    site.stop_all()


@pytest.fixture
def site(agent_site):
    agent_site.reset()
    yield agent_site
    agent_site.stop_agents()


def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_agent_stores_files_once(site):
    agent = site.start_agent()
    files = {f"study/slice-{number:02d}.dcm": make_instance() for number in range(6)}
    for name, data in files.items():
        _write(site.watch / name, data)

    uids = [sop_instance_uid(data) for data in files.values()]
    stored = site.wait_stored(uids)
    agent.wait_for_log("Stored file", len(files))

    assert site.statistics()["CountInstances"] == len(files)
    for uid, instance in stored.items():
        assert site.source_machine(instance) == MACHINE_ID
    for name, data in files.items():
        assert site.stored_md5(stored[sop_instance_uid(data)]) == md5(data)

    rows = site.spool_rows()
    assert len(rows) == len(files)
    assert {row["state"] for row in rows} == {"sent"}
    assert {row["instance_id"] for row in rows} == set(stored.values())
    assert all(len(row["sha256"]) == 64 for row in rows)

    log = agent.log_text()
    for name in files:
        assert log.count(f"Stored file {site.watch / name} ") == 1
    assert agent.stop() == 0
    assert "dicomfleet agent stopped." in agent.log_text()


def test_agent_restart_skips_sent_files(site):
    agent = site.start_agent()
    data = make_instance()
    _write(site.watch / "one.dcm", data)
    site.wait_stored([sop_instance_uid(data)])
    assert agent.stop() == 0

    second = site.start_agent()
    time.sleep(1.5)

    assert second.log_text().count(f"Stored file {site.watch / 'one.dcm'} ") == 1
    assert len(site.spool_rows()) == 1


def test_agent_quarantines_bad_files(site):
    agent = site.start_agent()
    _write(site.watch / "notes" / "random.dcm", os.urandom(4096))
    # copy2 keeps the old mtime, so the truncated file counts as long finished and
    # is not held back as a file that may still be written.
    (site.watch / "notes").mkdir(exist_ok=True)
    shutil.copy2(PYDICOM_FILES / "MR_truncated.dcm", site.watch / "notes" / "MR_truncated.dcm")
    _write(site.watch / "empty.dcm", b"")
    os.utime(site.watch / "empty.dcm", (time.time() - 3600, time.time() - 3600))
    valid = make_instance()
    _write(site.watch / "valid.dcm", valid)

    site.wait_stored([sop_instance_uid(valid)])
    agent.wait_for_log("Stored file")
    quarantine = site.state / "quarantine" / MACHINE_ID
    wait_until(lambda: len(site.quarantined()) == 3, timeout=15, message="three quarantined files")

    assert (quarantine / "notes" / "random.dcm").read_bytes() != b""
    assert (quarantine / "notes" / "MR_truncated.dcm").read_bytes() == (PYDICOM_FILES / "MR_truncated.dcm").read_bytes()
    assert not (site.watch / "notes" / "random.dcm").exists()
    assert not (site.watch / "notes" / "MR_truncated.dcm").exists()
    assert not (site.watch / "empty.dcm").exists()

    truncated_note = (quarantine / "notes" / "MR_truncated.dcm.reason.txt").read_text(encoding="utf-8")
    assert "truncated: element (7FE0,0010)" in truncated_note
    assert f"original path: {site.watch / 'notes' / 'MR_truncated.dcm'}" in truncated_note
    assert "time: " in truncated_note
    random_note = (quarantine / "notes" / "random.dcm.reason.txt").read_text(encoding="utf-8")
    assert "not a DICOM file" in random_note
    empty_note = (quarantine / "empty.dcm.reason.txt").read_text(encoding="utf-8")
    assert "the file is empty (0 bytes)" in empty_note

    assert site.statistics()["CountInstances"] == 1
    states = {os.path.basename(row["path"]): row["state"] for row in site.spool_rows()}
    assert states == {"random.dcm": "quarantined", "MR_truncated.dcm": "quarantined",
                      "empty.dcm": "quarantined", "valid.dcm": "sent"}
    wait_until(lambda: site.status()["machines"][MACHINE_ID]["files_quarantined"] == 3, timeout=10,
               message="the status file to count three quarantined files")
    assert agent.log_text().count("Quarantined file") == 3


def test_agent_part_file_after_rename(site):
    agent = site.start_agent()
    data = make_instance()
    temporary = site.watch / "incoming.dcm.part"
    _write(temporary, data)
    time.sleep(1.5)

    assert site.statistics()["CountInstances"] == 0
    assert site.spool_rows() == []

    final = site.watch / "incoming.dcm"
    os.rename(temporary, final)
    stored = site.wait_stored([sop_instance_uid(data)])
    agent.wait_for_log("Stored file")

    assert site.stored_md5(stored[sop_instance_uid(data)]) == md5(data)
    rows = site.spool_rows()
    assert [row["path"] for row in rows] == [str(final)]
    assert agent.log_text().count("Stored file") == 1


def test_agent_slow_writer_sent_complete(site):
    agent = site.start_agent()
    data = make_instance("MR_small.dcm")
    target = site.watch / "slow.dcm"
    chunk = len(data) // 4 + 1

    # One open handle, flushed chunk by chunk: the file grows, and inotify reports no close until the end.
    with open(target, "wb") as handle:
        for start in range(0, len(data), chunk):
            handle.write(data[start:start + chunk])
            handle.flush()
            os.fsync(handle.fileno())
            time.sleep(0.3)

    stored = site.wait_stored([sop_instance_uid(data)])
    agent.wait_for_log("Stored file")
    time.sleep(1.0)

    assert site.stored_md5(stored[sop_instance_uid(data)]) == md5(data)
    assert site.statistics()["CountInstances"] == 1
    assert agent.log_text().count("Stored file") == 1
    assert [row["state"] for row in site.spool_rows()] == ["sent"]


def test_agent_chunked_writer_sent_complete(site):
    agent = site.start_agent()
    data = make_instance("CT_small.dcm")
    target = site.watch / "chunked.dcm"
    # Chunk ends fall inside Pixel Data, so every partial file declares more bytes than it has.
    cuts = [len(data) // 3, 2 * len(data) // 3, len(data)]

    start = 0
    for cut in cuts:
        # Each open-append-close makes inotify report IN_CLOSE_WRITE on a partial file.
        with open(target, "ab") as handle:
            handle.write(data[start:cut])
        start = cut
        time.sleep(0.4)

    stored = site.wait_stored([sop_instance_uid(data)])
    agent.wait_for_log("Stored file")
    time.sleep(1.0)

    assert site.stored_md5(stored[sop_instance_uid(data)]) == md5(data)
    assert agent.log_text().count("Stored file") == 1
    assert site.quarantined() == []
    sent = [row for row in site.spool_rows() if row["state"] == "sent"]
    assert len(sent) == 1
    assert sent[0]["size"] == len(data)


def test_agent_unusual_names_and_new_folders(site):
    agent = site.start_agent()
    files = {
        site.watch / "Müller Jürgen" / "Serie 1" / "Bild ß 01.dcm": make_instance(),
        site.watch / "患者" / "画像 2.dcm": make_instance("MR_small.dcm"),
        site.watch / "new" / "a" / "b" / "c" / "deep.dcm": make_instance(),
        site.watch / os.fsdecode(b"caf\xe9 latin1.dcm"): make_instance(),
    }
    for path, data in files.items():
        _write(path, data)

    stored = site.wait_stored([sop_instance_uid(data) for data in files.values()])
    agent.wait_for_log("Stored file", len(files))

    assert len(stored) == len(files)
    assert {row["path"] for row in site.spool_rows()} == {str(path) for path in files}
    later = site.watch / "new" / "a" / "b" / "c" / "later" / "again.dcm"
    later_data = make_instance()
    _write(later, later_data)
    site.wait_stored([sop_instance_uid(later_data)])
    log = agent.wait_for_log("Stored file", len(files) + 1)
    assert log.count("Stored file") == len(files) + 1


def test_agent_symlink_loop_and_folder_links(site, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _write(outside / "elsewhere.dcm", make_instance())
    (site.watch / "loop").symlink_to(site.watch, target_is_directory=True)
    (site.watch / "linked").symlink_to(outside, target_is_directory=True)
    agent = site.start_agent()

    data = make_instance()
    _write(site.watch / "real" / "image.dcm", data)
    site.wait_stored([sop_instance_uid(data)])
    agent.wait_for_log("Stored file")
    time.sleep(1.0)

    assert agent.process.poll() is None
    assert site.statistics()["CountInstances"] == 1
    assert [row["path"] for row in site.spool_rows()] == [str(site.watch / "real" / "image.dcm")]


def test_agent_rescan_finds_hard_link(site, tmp_path):
    agent = site.start_agent()
    data = make_instance()
    source = tmp_path / "made-elsewhere.dcm"
    source.write_bytes(data)
    # A hard link raises only IN_CREATE, which the agent does not treat as a finished file.
    os.link(source, site.watch / "linked.dcm")

    site.wait_stored([sop_instance_uid(data)], timeout=10)
    log = agent.wait_for_log("Stored file")

    assert log.count(f"Stored file {site.watch / 'linked.dcm'} ") == 1


def test_agent_polled_folder_sends_files(site):
    site.write_config(polling=True)
    agent = site.start_agent()
    assert "(polled)" in agent.log_text()

    data = make_instance()
    target = site.watch / "share" / "polled.dcm"
    target.parent.mkdir()
    with open(target, "wb") as handle:
        half = len(data) // 2
        handle.write(data[:half])
        handle.flush()
        time.sleep(0.3)
        handle.write(data[half:])

    stored = site.wait_stored([sop_instance_uid(data)])
    log = agent.wait_for_log("Stored file")

    assert site.stored_md5(stored[sop_instance_uid(data)]) == md5(data)
    assert log.count("Stored file") == 1


def test_agent_status_file_reports_machine(site):
    agent = site.start_agent()
    data = make_instance()
    _write(site.watch / "status.dcm", data)
    site.wait_stored([sop_instance_uid(data)])

    def status_counts_sent():
        machine = site.status()["machines"][MACHINE_ID]
        return machine if machine["files_sent_today"] == 1 else None

    machine = wait_until(status_counts_sent, timeout=12, interval=0.5, message="the status file to count one sent file")
    document = site.status()

    assert document["agent_version"]
    assert machine["transport"] == "rest"
    assert machine["state"] == "sending"
    assert machine["files_queued"] == 0
    assert machine["files_failed"] == 0
    assert machine["files_quarantined"] == 0
    assert machine["oldest_queued_age_s"] is None
    assert machine["last_success_at"] is not None
    assert machine["watch_folders"][str(site.watch)]["free_bytes"] > 0
    assert agent.stop() == 0
