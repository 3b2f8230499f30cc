"""The pyinfra deploy on real lab hosts: services up, files carried, reruns change nothing.

A copy of the lab inventory runs on its own addresses and ports (site
`deploytest`, 127.0.10.101 and up), so it never meets `make demo`'s lab.
"""

from __future__ import annotations

import base64
import collections
import http.client
import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pymongo
import pytest
import requests
import yaml

from dicomfleet import credentials, demo, deployment, lab, tls
from dicomfleet.inventory import load_site

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[1]
CENTRAL = "127.0.10.101"
SCANNERS = {"ct1": "127.0.10.111", "mr1": "127.0.10.112", "xr1": "127.0.10.113"}
NEW_SCANNER = ("ct2", "127.0.10.114")
HTTP_PORT = 8142
DASHBOARD_HTTPS_PORT = 8443
MONGODB_PORT = 27117

_RESULT_LINE = re.compile(r"^\s+\[([A-Za-z0-9_.-]+)\]\s+(Success|No changes|Skipped|Error)\s*$")


def _inventory(folder: Path, with_new_scanner: bool) -> Path:
    document = yaml.safe_load((ROOT / "inventory" / "lab.yml").read_text())
    document["all"]["vars"]["dicomfleet_site"] = "deploytest"
    central = document["all"]["children"]["central"]["hosts"]["central"]
    central.update({
        "ansible_host": CENTRAL,
        "dicomfleet_orthanc_http_port": HTTP_PORT,
        "dicomfleet_orthanc_dicom_port": 4342,
        "dicomfleet_mongodb_port": MONGODB_PORT,
        "dicomfleet_mongodb_bind": CENTRAL,
        "dicomfleet_orthanc_stable_age": 2,
    })
    scanners = document["all"]["children"]["scanners"]["hosts"]
    for host, address in SCANNERS.items():
        scanners[host]["ansible_host"] = address
    if with_new_scanner:
        name, address = NEW_SCANNER
        scanners[name] = dict(scanners["ct1"], ansible_host=address, dicomfleet_machine_id=name,
                              dicomfleet_ae_title="CT_ROOM2", dicomfleet_location="Radiology, CT room 2")
    # Adding a machine is an edit of the same inventory file.
    path = folder / "deploytest.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _changes_per_host(result: subprocess.CompletedProcess) -> collections.Counter:
    """Count the operations pyinfra reported as changed, per host.

    pyinfra prints each operation's per-host result on stderr.
    """
    changed = collections.Counter()
    for line in (result.stdout + result.stderr).splitlines():
        match = _RESULT_LINE.match(line)
        if match and match.group(2) == "Success":
            changed[match.group(1)] += 1
    return changed


def _wait_for_record(database, study_uid: str, timeout: float = 90.0) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = database.studies.find_one({"studyInstanceUID": study_uid})
        except pymongo.errors.PyMongoError:
            record = None
        if record:
            return record
        time.sleep(1)
    return None


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deploytest")
    path = _inventory(folder, with_new_scanner=False)
    site = load_site(path)
    lab.up(site, fresh=True)
    started = time.monotonic()
    first = deployment.deploy(path, capture=True)
    first_seconds = time.monotonic() - started
    yield {"path": path, "site": site, "first": first, "first_seconds": first_seconds, "folder": folder}
    lab.down(site)


@pytest.fixture(scope="module")
def mongodb():
    client = pymongo.MongoClient(f"mongodb://{CENTRAL}:{MONGODB_PORT}/", serverSelectionTimeoutMS=5000)
    yield client["dicomfleet"]
    client.close()


def test_first_deploy_succeeds(deployed):
    assert deployed["first"].returncode == 0, deployed["first"].stdout[-3000:] + deployed["first"].stderr[-3000:]


@pytest.mark.parametrize("address, unit", [
    (CENTRAL, "orthanc.service"),
    (CENTRAL, "dicomfleet-sync.service"),
    (CENTRAL, "dicomfleet-mongodb.service"),
    (SCANNERS["ct1"], "dicomfleet-agent.service"),
    (SCANNERS["mr1"], "dicomfleet-agent.service"),
    (SCANNERS["xr1"], "dicomfleet-agent.service"),
])
def test_service_active(deployed, address, unit):
    result = lab.ssh(address, f"systemctl is-active {unit}", check=False)
    assert result.stdout.strip() == "active"


def test_agent_runs_as_own_user(deployed):
    result = lab.ssh(SCANNERS["ct1"], "ps -o user= -C dicomfleet -C python3 | sort -u", check=False)
    assert result.stdout.split() == ["dicomfleet-agent"]


def test_secret_file_root_only(deployed):
    result = lab.ssh(SCANNERS["ct1"], "stat -c '%U %a' /etc/dicomfleet/credentials/orthanc-ct1.password")
    assert result.stdout.strip() == "root 600"


def test_dropped_file_reaches_mongodb(deployed, mongodb):
    site = deployed["site"]
    (ct_small,) = [f for f in demo.select_files("CT") if f.name == "CT_small.dcm"]
    demo.drop_files(site, site.machines["ct1"], [ct_small])
    record = _wait_for_record(mongodb, ct_small.study_instance_uid)
    assert record is not None
    assert record["sourceMachine"] == "ct1"


def test_dashboard_served_by_nginx_over_https(deployed):
    site = deployed["site"]
    ca_file = tls.ca_certificate_file(site, credentials.existing_secrets(site))
    answer = requests.get(f"https://{CENTRAL}:{DASHBOARD_HTTPS_PORT}/login", verify=str(ca_file), timeout=10)
    assert answer.status_code == 200
    # requests joins a repeated header with ", ".
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_dashboard_redirect_keeps_https_port(deployed):
    site = deployed["site"]
    ca_file = tls.ca_certificate_file(site, credentials.existing_secrets(site))
    answer = requests.get(f"https://{CENTRAL}:{DASHBOARD_HTTPS_PORT}/fleet", verify=str(ca_file), timeout=10,
                          allow_redirects=False)
    assert answer.headers["Location"].startswith(f"https://{CENTRAL}:{DASHBOARD_HTTPS_PORT}/login")


def test_orthanc_plain_http_refused_from_network_address(deployed):
    # Orthanc takes only 127.0.0.1 as local: a request from a scanner's address with the
    # admin's own password is refused, while nginx (from 127.0.0.1) is served.
    site = deployed["site"]
    password = credentials.existing_secrets(site).orthanc_password(credentials.ADMIN_USER)
    token = base64.b64encode(f"{credentials.ADMIN_USER}:{password}".encode()).decode()
    connection = http.client.HTTPConnection(CENTRAL, HTTP_PORT, timeout=10, source_address=(SCANNERS["ct1"], 0))
    try:
        connection.request("GET", "/system", headers={"Authorization": f"Basic {token}"})
        status = connection.getresponse().status
    finally:
        connection.close()
    assert status == 401


def test_check_reaches_orthanc_through_nginx(deployed):
    result = subprocess.run([str(ROOT / ".venv/bin/dicomfleet"), "check", str(deployed["path"]), "ct1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"reached https://{CENTRAL}:443 as user ct1" in result.stdout


def _heartbeats_by_status(path: Path) -> dict[str, str | None]:
    """Run ``dicomfleet status --json`` and return each machine's last heartbeat time."""
    result = subprocess.run([str(ROOT / ".venv/bin/dicomfleet"), "status", "--json", str(path)],
                            capture_output=True, text=True, timeout=60)
    document = json.loads(result.stdout)
    fleet = document["servers"][0]["fleet"] or {"machines": []}
    return {row["id"]: row["last_heartbeat_at"] for row in fleet["machines"]}


def test_agents_report_to_dashboard_over_https(deployed):
    # Every agent's heartbeat crosses nginx's TLS, checked against the site CA, and
    # dicomfleet status reads them over HTTPS too.
    deadline = time.monotonic() + 90
    heartbeats = _heartbeats_by_status(deployed["path"])
    while time.monotonic() < deadline and None in heartbeats.values():
        time.sleep(5)
        heartbeats = _heartbeats_by_status(deployed["path"])
    assert sorted(machine for machine, at in heartbeats.items() if at is not None) == sorted(SCANNERS)


def test_second_deploy_changes_nothing(deployed):
    second = deployment.deploy(deployed["path"], capture=True)
    assert second.returncode == 0
    reported = [line for line in (second.stdout + second.stderr).splitlines() if _RESULT_LINE.match(line)]
    assert reported != []
    assert _changes_per_host(second) == collections.Counter()


def test_invalid_inventory_contacts_no_host(deployed, tmp_path):
    document = yaml.safe_load(deployed["path"].read_text())
    scanners = document["all"]["children"]["scanners"]["hosts"]
    scanners["ct1"]["dicomfleet_ae_title"] = "MR_ROOM1"
    scanners["ct1"]["ansible_host"] = "127.0.10.199"
    path = tmp_path / "invalid.yml"
    path.write_text(yaml.safe_dump(document))

    with socket.socket() as listener:
        listener.bind(("127.0.10.199", 22))
        listener.listen()
        listener.settimeout(0.5)
        result = subprocess.run([str(ROOT / ".venv/bin/dicomfleet"), "deploy", str(path)],
                                capture_output=True, text=True, timeout=120)
        try:
            listener.accept()
            contacted = True
        except socket.timeout:
            contacted = False

    assert result.returncode == 1
    assert f"{path}: host ct1: dicomfleet_ae_title: 'MR_ROOM1' is already used by host mr1" in result.stderr \
        or f"{path}: host mr1: dicomfleet_ae_title: 'MR_ROOM1' is already used by host ct1" in result.stderr
    assert contacted is False


def test_adding_machine_changes_only_central_and_new_host(deployed):
    path = _inventory(deployed["folder"], with_new_scanner=True)
    site = load_site(path)
    lab.up(site)
    result = deployment.deploy(path, capture=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert set(_changes_per_host(result)) == {"central", NEW_SCANNER[0]}


def test_new_machine_agent_active(deployed):
    result = lab.ssh(NEW_SCANNER[1], "systemctl is-active dicomfleet-agent.service", check=False)
    assert result.stdout.strip() == "active"


def test_new_machine_files_carry_its_identity(deployed, mongodb):
    site = load_site(deployed["folder"] / "deploytest.yml")
    (ct_file,) = [f for f in demo.select_files("CT") if f.name.endswith("CT2N_6293.dcm")]
    demo.drop_files(site, site.machines["ct2"], [ct_file])

    record = _wait_for_record(mongodb, ct_file.study_instance_uid)
    assert record is not None
    assert "ct2" in record.get("sourceMachines", [record.get("sourceMachine")])

    secrets = credentials.existing_secrets(site)
    auth = (credentials.ADMIN_USER, secrets.orthanc_password(credentials.ADMIN_USER))
    base = f"http://{CENTRAL}:{HTTP_PORT}"
    (found,) = requests.post(f"{base}/tools/lookup", data=ct_file.sop_instance_uid, auth=auth, timeout=10).json()
    metadata = requests.get(f"{base}/instances/{found['ID']}/metadata?expand", auth=auth, timeout=10).json()
    assert metadata["HttpUsername"] == "ct2"
