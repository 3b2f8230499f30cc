"""``dicomfleet check``: a test image through a machine's real ingest path (agent, Orthanc, sync, MongoDB), then removed."""

from __future__ import annotations

import pytest
import requests

from test_dashboard_support import MACHINES, DashboardSite, wait_until


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    running = DashboardSite(tmp_path_factory.mktemp("check")).start()
    try:
        running.start_sync()
        running.start_agent("ct1")
        wait_until(running.agent_status_file("ct1").exists, 90, "the agent of ct1 to start")
        yield running
    finally:
        running.stop()


def _check(site: DashboardSite, machine_id: str, *options: str):
    return site.run_command("check", str(site.inventory), machine_id, "--timeout", "30",
                            "--password-file", str(site.agent_password_file(machine_id)), *options)


@pytest.fixture(scope="module")
def passed_run(site):
    return _check(site, "ct1")


def test_check_passes_every_step(passed_run):
    assert passed_run.returncode == 0, passed_run.stdout + passed_run.stderr
    lines = [line for line in passed_run.stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] + "]" for line in lines] == ["[PASS]"] * 5
    assert "HttpUsername ct1" in passed_run.stdout
    assert "sourceMachine ct1" in passed_run.stdout


def test_check_leaves_nothing_behind(site, passed_run):
    study_uid = passed_run.stdout.split("Study Instance UID ")[1].split(")")[0]
    records = site.database["studies"].count_documents({"studyInstanceUID": study_uid})
    assert records == 0
    lookup = requests.post(site.orthanc.url + "/tools/lookup", data=study_uid, auth=site.orthanc.admin_auth,
                           timeout=10).json()
    assert lookup == []
    assert list((site.folder / "export" / "ct1").glob("dicomfleet-check-*")) == []


def test_check_fails_when_agent_stopped(site):
    agent = site.agents.pop("mr1", None) or site.start_agent("mr1")
    wait_until(site.agent_status_file("mr1").exists, 90, "the agent of mr1 to start")
    agent.terminate()
    agent.wait(timeout=30)
    result = site.run_command("check", str(site.inventory), "mr1", "--timeout", "5",
                              "--password-file", str(site.agent_password_file("mr1")))
    assert result.returncode == 1
    assert "[PASS] host reaches Orthanc" in result.stdout
    assert "[FAIL] seen in Orthanc with the machine's identity" in result.stdout
    assert "[SKIP] recorded in MongoDB" in result.stdout
    assert list((site.folder / "export" / "mr1").glob("dicomfleet-check-*")) == []


def test_check_fails_with_wrong_password(site, tmp_path):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    result = site.run_command("check", str(site.inventory), "xr1", "--timeout", "5", "--password-file", str(wrong))
    assert result.returncode == 1
    assert "[FAIL] host reaches Orthanc" in result.stdout
    assert "HTTP 401" in result.stdout


def test_check_unknown_machine_exit_2(site):
    result = site.run_command("check", str(site.inventory), "ct9")
    assert result.returncode == 2
    assert "no machine 'ct9'" in result.stderr
    assert sorted(MACHINES)[0] in result.stderr
