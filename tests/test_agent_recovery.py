"""End-to-end tests of the agent under failure: Orthanc down, agent killed, wrong password, unreadable file.

Every test drives the agent as a real subprocess against a real Orthanc on loopback.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest

from agent_support import MACHINE_ID, AgentProcess, AgentSite, make_instance, md5, sop_instance_uid, wait_until


@pytest.fixture(scope="module")
def agent_site(tmp_path_factory):
    site = AgentSite(tmp_path_factory.mktemp("agent-recovery"))
    site.orthanc.start()
    yield site
    site.stop_all()


@pytest.fixture
def site(agent_site):
    agent_site.reset()
    yield agent_site
    agent_site.stop_agents()


def _drop(site: AgentSite, count: int, folder: str = "") -> dict[str, bytes]:
    files = {}
    for number in range(count):
        path = site.watch / folder / f"image-{number:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = make_instance()
        path.write_bytes(data)
        files[str(path)] = data
    return files


def _send_attempts(log: str) -> int:
    return len(re.findall(r"Sending file .* \(spool record \d+, attempt \d+\)", log))


def test_agent_orthanc_down_then_restarted(site):
    agent = site.start_agent()
    site.orthanc.stop()

    files = _drop(site, 5)
    doomed = site.watch / "deleted-before-send.dcm"
    doomed.write_bytes(make_instance())
    wait_until(lambda: "is unreachable for machine" in agent.log_text(), timeout=15,
               message="the agent to notice that Orthanc is down")
    time.sleep(2.0)

    doomed.unlink()
    rows = site.spool_rows()
    assert len(rows) == 6
    assert {row["state"] for row in rows} <= {"queued", "failed", "sending"}
    log_during_outage = agent.log_text()
    assert log_during_outage.count("is unreachable for machine") == 1
    assert "Stored file" not in log_during_outage

    site.orthanc.start()
    stored = site.wait_stored([sop_instance_uid(data) for data in files.values()], timeout=40)
    agent.wait_for_log("Stored file", len(files))

    assert site.statistics()["CountInstances"] == len(files)
    for path, data in files.items():
        assert site.stored_md5(stored[sop_instance_uid(data)]) == md5(data)
    wait_until(lambda: "deleted before it was sent" in agent.log_text(), timeout=15,
               message="the agent to forget the deleted file")
    log = agent.log_text()
    assert "is reachable again for machine ct1" in log
    assert log.count("is unreachable for machine") == 1
    assert sorted(row["path"] for row in site.spool_rows()) == sorted(files)
    assert {row["state"] for row in site.spool_rows()} == {"sent"}


def test_agent_killed_during_backlog(site):
    files = _drop(site, 60, folder="backlog")
    agent = site.start_agent()

    wait_until(lambda: site.statistics()["CountInstances"] >= 10, timeout=30, interval=0.02,
               message="the first files of the backlog in Orthanc")
    agent.kill()
    stored_at_kill = site.statistics()["CountInstances"]
    assert stored_at_kill < len(files)

    restarted = site.start_agent()
    site.wait_stored([sop_instance_uid(data) for data in files.values()], timeout=60)
    wait_until(lambda: {row["state"] for row in site.spool_rows()} == {"sent"}, timeout=15,
               message="every spool record to be sent")
    time.sleep(1.0)

    assert site.statistics()["CountInstances"] == len(files)
    rows = site.spool_rows()
    assert len(rows) == len(files)
    assert {row["state"] for row in rows} == {"sent"}
    assert restarted.log_text().count("dicomfleet agent") >= 2
    for instance in {row["instance_id"] for row in rows[:10]}:
        assert site.source_machine(instance) == MACHINE_ID


def test_agent_wrong_password_then_fixed(site):
    site.write_config()
    right_password = site.password_file.read_text()
    site.password_file.write_text("not-the-password\n")
    agent = site.start_agent()

    files = _drop(site, 8)
    wait_until(lambda: "rejected the credentials of machine ct1" in agent.log_text(), timeout=15,
               message="the agent to report the rejected credentials")
    time.sleep(0.5)
    attempts_after_rejection = _send_attempts(agent.log_text())
    time.sleep(3.0)

    log = agent.log_text()
    assert len(re.findall(r"ERROR .*rejected the credentials of machine ct1", log)) == 1
    # Each of the 2 workers may have had a file in flight when the first 401 arrived; then nothing for 60 s.
    assert attempts_after_rejection <= 2
    assert _send_attempts(log) == attempts_after_rejection
    assert "not-the-password" not in log
    assert right_password.strip() not in log
    assert site.statistics()["CountInstances"] == 0
    rows = site.spool_rows()
    assert len(rows) == len(files)
    assert {row["state"] for row in rows} == {"queued"}
    wait_until(lambda: site.status()["machines"][MACHINE_ID]["state"] == "credentials_rejected", timeout=12,
               interval=0.5, message="the status file to report rejected credentials")
    machine = site.status()["machines"][MACHINE_ID]
    assert machine["files_queued"] == len(files)
    assert "HTTP 401" in machine["last_error"]
    assert agent.stop() == 0

    site.password_file.write_text(right_password)
    fixed = site.start_agent()
    site.wait_stored([sop_instance_uid(data) for data in files.values()])
    fixed.wait_for_log("Stored file", len(files))

    assert site.statistics()["CountInstances"] == len(files)
    assert {row["state"] for row in site.spool_rows()} == {"sent"}
    assert fixed.process.poll() is None


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to drop root's file access")
def test_agent_retries_unreadable_file(site):
    # Without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, root obeys file modes like any user.
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    agent = site.start_agent(prefix=prefix)
    locked_data = make_instance()
    locked = site.watch / "locked.dcm"
    locked.write_bytes(locked_data)
    locked.chmod(0)
    readable = _drop(site, 2)

    site.wait_stored([sop_instance_uid(data) for data in readable.values()])
    def locked_row():
        rows = [row for row in site.spool_rows() if row["path"] == str(locked)]
        return rows[0] if rows and rows[0]["last_error"] else None

    row = wait_until(locked_row, timeout=10, message="the spool to record the unreadable file's error")
    assert "Permission denied" in row["last_error"]
    assert "Cannot read file" in agent.log_text()
    assert agent.process.poll() is None

    locked.chmod(0o644)
    stored = site.wait_stored([sop_instance_uid(locked_data)], timeout=30)

    assert site.stored_md5(stored[sop_instance_uid(locked_data)]) == md5(locked_data)
    assert agent.log_text().count("Cannot read file") == 1


def test_agent_rejects_archive_without_folder(site):
    config = site.write_config()
    config.write_text(config.read_text().replace('after_send = "keep"', 'after_send = "archive"'))

    process = AgentProcess(config, site.log_path)
    status = process.process.wait(timeout=20)
    process.handle.close()

    assert status == 2
    log = site.log_path.read_text()
    assert "after_send = 'archive' needs archive_folder" in log
    assert "machine 'ct1'" in log
    assert str(config) in log
