"""``dicomfleet status``: the terminal table, --json and exit codes, read from the real dashboard."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import pytest
import yaml

from agent_support import TlsTunnel, make_test_ca
from dicomfleet import tls
from dicomfleet.localservers import free_port
from test_dashboard_support import DashboardSite, heartbeat_body, wait_until


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    running = DashboardSite(tmp_path_factory.mktemp("status")).start()
    yield running
    running.stop()


def _all_reporting(site: DashboardSite) -> None:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    for machine_id in ("ct1", "mr1", "xr1"):
        answer = site.post_heartbeat(machine_id, heartbeat_body(machine_id, last_success_at=now,
                                                                files_sent_today=3))
        assert answer.status_code == 200


def _record_study(site: DashboardSite, machine_id: str, instances: int) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    site.database["studies"].insert_one({
        "orthancName": "local", "studyInstanceUID": f"1.2.826.0.1.3680043.{machine_id}.{instances}",
        "sourceMachine": machine_id, "instanceCount": instances, "seriesCount": 1,
        "lastReceivedAt": now, "firstReceivedAt": now, "patientName": "DOE^JANE"})


def test_status_offline_machine_exit_1(site):
    site.database["machine_heartbeats"].delete_many({})
    site.dashboard.stop()
    site.start_dashboard()
    site.post_heartbeat("ct1", heartbeat_body("ct1"))
    result = site.run_command("status", str(site.inventory))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    (mr1,) = [line for line in lines if line.startswith("mr1 ")]
    assert "offline" in mr1
    assert "never" in mr1


def test_status_all_ok_exit_0(site):
    _all_reporting(site)
    result = site.run_command("status", str(site.inventory))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 machines: 3 ok, 0 warning, 0 silent, 0 offline" in result.stdout
    assert "Orthanc local: online, version 1.10.1" in result.stdout


def test_status_shows_today_counts(site):
    _all_reporting(site)
    _record_study(site, "mr1", 24)
    _record_study(site, "mr1", 6)
    # The dashboard reads the study counts every few seconds.
    wait_until(lambda: site.machine_row("mr1")["studies_today"] == 2, 20, "mr1's two studies on the dashboard")
    result = site.run_command("status", str(site.inventory))
    (mr1,) = [line for line in result.stdout.splitlines() if line.startswith("mr1 ")]
    cells = mr1.split()
    assert cells[1] == "ok"
    assert "2" in cells
    assert "30" in cells


def test_status_json(site):
    _all_reporting(site)
    result = site.run_command("status", str(site.inventory), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["exit_status"] == 0
    (server,) = document["servers"]
    machines = {row["id"]: row for row in server["fleet"]["machines"]}
    assert sorted(machines) == ["ct1", "mr1", "xr1"]
    assert machines["ct1"]["files_sent_today"] == 3
    assert server["fleet"]["orthanc"]["online"] is True


def test_status_json_silent_exit_1(site):
    old = (datetime.datetime.now() - datetime.timedelta(hours=5)).astimezone().isoformat(timespec="seconds")
    _all_reporting(site)
    site.post_heartbeat("xr1", heartbeat_body("xr1", last_success_at=old))
    site.database["studies"].delete_many({"sourceMachine": "xr1"})
    result = site.run_command("status", str(site.inventory), "--json")
    assert result.returncode == 1
    document = json.loads(result.stdout)
    machines = {row["id"]: row for row in document["servers"][0]["fleet"]["machines"]}
    assert machines["xr1"]["state"] == "silent"
    assert document["exit_status"] == 1


def test_status_unreachable_dashboard_exit_3(site, tmp_path):
    document = yaml.safe_load(site.inventory.read_text())
    central = document["all"]["children"]["central"]["hosts"]["central"]
    central["dicomfleet_dashboard_url"] = f"http://127.0.0.1:{free_port()}"
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump(document))
    result = site.run_command("status", str(inventory))
    assert result.returncode == 3
    assert "does not answer" in result.stdout


def _https_inventory(site: DashboardSite, tmp_path, url: str):
    document = yaml.safe_load(site.inventory.read_text())
    document["all"]["children"]["central"]["hosts"]["central"]["dicomfleet_dashboard_url"] = url
    inventory = tmp_path / "https.yml"
    inventory.write_text(yaml.safe_dump(document))
    return inventory


@pytest.fixture
def site_ca_front(site, tmp_path):
    """The dashboard behind a TLS front with a certificate from the site CA in the site's secrets."""
    certificate = tls.site_ca(site.site, site.secrets).host_certificate("central", ["127.0.0.1"], [])
    bundle = tmp_path / "front.pem"
    bundle.write_text(certificate.certificate + certificate.key)
    tunnel = TlsTunnel(bundle, site.port)
    yield tunnel
    tunnel.close()


def test_status_over_https_checks_site_ca(site, site_ca_front, tmp_path):
    _all_reporting(site)
    result = site.run_command("status", str(_https_inventory(site, tmp_path, site_ca_front.url)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"(dashboard {site_ca_front.url}, as of" in result.stdout


def test_status_over_https_refuses_other_certificate(site, tmp_path):
    _, bundle = make_test_ca(tmp_path / "other-ca")
    tunnel = TlsTunnel(bundle, site.port)
    try:
        result = site.run_command("status", str(_https_inventory(site, tmp_path, tunnel.url)))
    finally:
        tunnel.close()
    assert result.returncode == 3
    assert "CERTIFICATE_VERIFY_FAILED" in result.stdout


def test_status_without_secrets_exit_3(site, tmp_path):
    result = subprocess.run([sys.executable, "-m", "dicomfleet", "status", str(site.inventory)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DICOMFLEET_SECRETS_DIR": str(tmp_path)})
    assert result.returncode == 3
    assert "no password for the dashboard user dicomfleet" in result.stdout


def test_status_invalid_inventory_exit_2(site, tmp_path):
    inventory = tmp_path / "broken.yml"
    inventory.write_text("all:\n  children:\n    central:\n      hosts:\n        c:\n"
                         "          dicomfleet_dashboard_port: 99999\n")
    result = site.run_command("status", str(inventory))
    assert result.returncode == 2
    assert "dicomfleet_dashboard_port" in result.stderr
