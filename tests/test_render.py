"""Rendering: the files the deploy would put on each host, from the shipped inventories."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest

from dicomfleet import credentials, render
from dicomfleet.inventory import load_site

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "inventory" / "lab.yml"
EXAMPLE = ROOT / "inventory" / "example-hospital.yml"


@pytest.fixture
def example_site():
    return load_site(EXAMPLE)


@pytest.fixture
def example_secrets(example_site, tmp_path):
    return credentials.ensure_secrets(example_site, tmp_path / "secrets")


def _file(plan: render.HostPlan, path: str) -> render.ManagedFile:
    (managed,) = [f for f in plan.files if f.path == path]
    return managed


def test_deployed_hosts_skip_dicom_machines(example_site):
    assert render.deployed_hosts(example_site) == ["pacs1", "ct-room1", "mri1", "xr-room2"]


def test_orthanc_json_registers_dicom_senders(example_site, example_secrets):
    plan = render.plan_host(example_site, "pacs1", example_secrets)
    config = json.loads(_file(plan, "/etc/orthanc/orthanc.json").content)
    assert sorted(config["DicomModalities"]) == ["ct-room2", "mri1", "xr-room1"]
    assert config["DicomModalities"]["xr-room1"]["AET"] == "XR_ROOM1"
    assert config["DicomModalities"]["xr-room1"]["Host"] == "198.51.100.31"


@pytest.mark.parametrize("key, value", [
    ("DicomAlwaysAllowStore", False),
    ("DicomCheckModalityHost", True),
    ("AuthenticationEnabled", True),
    ("OverwriteInstances", False),
    ("DicomAet", "HOSP_ARCHIVE"),
    ("UserMetadata", {"SourceMachine": 1024}),
    ("MaximumPduLength", 131072),
])
def test_orthanc_json_security_settings(example_site, example_secrets, key, value):
    plan = render.plan_host(example_site, "pacs1", example_secrets)
    config = json.loads(_file(plan, "/etc/orthanc/orthanc.json").content)
    assert config[key] == value


def test_orthanc_json_has_no_password(example_site, example_secrets):
    plan = render.plan_host(example_site, "pacs1", example_secrets)
    content = _file(plan, "/etc/orthanc/orthanc.json").content
    password = example_secrets.orthanc_password("ct-room1")
    assert password not in content


def test_orthanc_users_one_per_agent_machine(example_site, example_secrets):
    plan = render.plan_host(example_site, "pacs1", example_secrets)
    users = json.loads(_file(plan, "/etc/orthanc/credentials.json").content)["RegisteredUsers"]
    assert sorted(users) == ["ct-room1", "dicomfleet-admin", "dicomfleet-dashboard", "dicomfleet-sync",
                             "mri1", "xr-room2"]
    assert len(set(users.values())) == 6


def test_orthanc_credentials_file_private(example_site, example_secrets):
    plan = render.plan_host(example_site, "pacs1", example_secrets)
    managed = _file(plan, "/etc/orthanc/credentials.json")
    assert (managed.mode, managed.group) == ("0640", "orthanc")


def test_secrets_reused(example_site, tmp_path):
    first = credentials.ensure_secrets(example_site, tmp_path / "s").orthanc_password("mri1")
    second = credentials.ensure_secrets(example_site, tmp_path / "s").orthanc_password("mri1")
    assert first == second


def test_secret_files_mode_0600(example_site, tmp_path):
    credentials.ensure_secrets(example_site, tmp_path / "s").orthanc_password("mri1")
    assert (tmp_path / "s" / "orthanc-mri1.password").stat().st_mode & 0o777 == 0o600


def test_agent_config_machine(example_site, example_secrets):
    plan = render.plan_host(example_site, "mri1", example_secrets)
    config = tomllib.loads(_file(plan, "/etc/dicomfleet/agent.toml").content)
    (machine,) = config["machine"]
    assert machine == {
        "id": "mri1",
        "ae_title": "MRI_1",
        "modality": "MR",
        "transport": "cstore",
        "watch_folders": ["/var/export/dicom"],
        "polling": False,
        "orthanc_url": "https://192.0.2.10:443",
        "ca_file": "/etc/dicomfleet/tls/site-ca.pem",
        "orthanc_aet": "HOSP_ARCHIVE",
        "orthanc_dicom_host": "192.0.2.10",
        "orthanc_dicom_port": 4242,
        "username": "mri1",
        "credential": "orthanc-mri1",
        "after_send": "keep",
    }


def test_agent_unit_loads_own_credential(example_site, example_secrets):
    plan = render.plan_host(example_site, "ct-room1", example_secrets)
    unit = _file(plan, "/etc/systemd/system/dicomfleet-agent.service").content
    assert "LoadCredential=orthanc-ct-room1:/etc/dicomfleet/credentials/orthanc-ct-room1.password" in unit


def test_sync_config_uses_given_mongodb(example_site, example_secrets):
    plan = render.plan_host(example_site, "pacs1", example_secrets)
    config = tomllib.loads(_file(plan, "/etc/dicomfleet/sync.toml").content)
    assert config["mongodb"]["uri"] == "mongodb://192.0.2.20:27017/?replicaSet=rs0"


def test_external_mongodb_no_embedded_server(example_site, example_secrets):
    plan = render.plan_host(example_site, "pacs1", example_secrets)
    assert "dicomfleet-mongodb.service" not in plan.services


def test_lab_central_runs_embedded_mongodb(tmp_path):
    site = load_site(LAB)
    plan = render.plan_host(site, "central", credentials.ensure_secrets(site, tmp_path))
    unit = _file(plan, "/etc/systemd/system/dicomfleet-mongodb.service").content
    assert "--host 127.0.10.1 --port 27017" in unit


def test_http_threads_sized_by_fleet(example_site):
    settings = render.orthanc_settings(example_site, example_site.servers["pacs1"])
    assert settings["http_threads"] == 50


def test_render_command_writes_every_host(tmp_path, project_root):
    out = tmp_path / "out"
    result = subprocess.run([str(project_root / ".venv/bin/dicomfleet"), "render", str(EXAMPLE), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ct-room1", "mri1", "pacs1", "xr-room2"]


@pytest.mark.parametrize("unit", [
    "dicomfleet-agent.service", "dicomfleet-sync.service", "dicomfleet-mongodb.service",
])
def test_unit_exposure_at_most_2(tmp_path, unit):
    site = load_site(LAB)
    secrets = credentials.ensure_secrets(site, tmp_path / "s")
    host = "ct1" if unit == "dicomfleet-agent.service" else "central"
    plan = render.plan_host(site, host, secrets)
    path = tmp_path / unit
    path.write_text(_file(plan, f"/etc/systemd/system/{unit}").content)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)],
                            capture_output=True, text=True)
    score = float(result.stdout.split("Overall exposure level for")[1].split(":")[1].split()[0])
    assert score <= 2.0
