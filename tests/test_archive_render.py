"""What the deploy puts on a central host for the archive: Orthanc's settings, plugins, sandbox, nginx, backups.

Everything here is rendered from inventories; no host is contacted.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dicomfleet import archive, backup_units, credentials, netplan, proxy, render
from dicomfleet.inventory import InventoryError, load_site
from test_archive_support import EXAMPLE, LAB, ROOT, file_of

ORTHANC_JSON = "/etc/orthanc/orthanc.json"


@pytest.fixture
def example_site():
    return load_site(EXAMPLE)


@pytest.fixture
def secrets(example_site, tmp_path):
    return credentials.ensure_secrets(example_site, tmp_path / "secrets")


def _with_central_vars(tmp_path: Path, values: dict) -> Path:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["all"]["children"]["central"]["hosts"]["pacs1"].update(values)
    path = tmp_path / "site.yml"
    path.write_text(yaml.safe_dump(document))
    return path


def _orthanc_json(path: Path, tmp_path: Path) -> dict:
    site = load_site(path)
    plan = render.plan_host(site, "pacs1", credentials.ensure_secrets(site, tmp_path / "s"))
    return json.loads(file_of(plan, ORTHANC_JSON).content)


@pytest.mark.parametrize("variable, value, key", [
    ("dicomfleet_orthanc_http_threads", 120, "HttpThreadsCount"),
    ("dicomfleet_orthanc_dicom_threads", 12, "DicomThreadsCount"),
    ("dicomfleet_orthanc_concurrent_jobs", 6, "ConcurrentJobs"),
    ("dicomfleet_orthanc_stable_age", 30, "StableAge"),
    ("dicomfleet_orthanc_storage_directory", "/srv/orthanc/storage", "StorageDirectory"),
    ("dicomfleet_orthanc_index_directory", "/srv/orthanc/index", "IndexDirectory"),
    ("dicomfleet_orthanc_storage_compression", True, "StorageCompression"),
    ("dicomfleet_orthanc_maximum_storage_mb", 500000, "MaximumStorageSize"),
    ("dicomfleet_orthanc_maximum_patient_count", 90000, "MaximumPatientCount"),
])
def test_inventory_setting_reaches_orthanc_json(tmp_path, variable, value, key):
    config = _orthanc_json(_with_central_vars(tmp_path, {variable: value}), tmp_path)
    assert config[key] == value


@pytest.mark.parametrize("key", ["MetricsEnabled", "KeepAlive", "TcpNoDelay"])
def test_orthanc_json_enables(example_site, secrets, key):
    config = json.loads(file_of(render.plan_host(example_site, "pacs1", secrets), ORTHANC_JSON).content)
    assert config[key] is True


def test_orthanc_refuses_remote_http_behind_nginx(example_site, secrets):
    config = json.loads(file_of(render.plan_host(example_site, "pacs1", secrets), ORTHANC_JSON).content)
    assert config["RemoteAccessAllowed"] is False


def test_orthanc_answers_remote_http_without_tls(tmp_path):
    config = _orthanc_json(_with_central_vars(tmp_path, {"dicomfleet_tls": False}), tmp_path)
    assert config["RemoteAccessAllowed"] is True


def test_orthanc_remote_access_setting_wins(tmp_path):
    config = _orthanc_json(_with_central_vars(tmp_path, {"dicomfleet_orthanc_remote_access": True}), tmp_path)
    assert config["RemoteAccessAllowed"] is True


def _fleet_inventory(tmp_path: Path, rest: int, dicom: int) -> Path:
    document = yaml.safe_load(EXAMPLE.read_text())
    scanners = {}
    for number in range(rest):
        scanners[f"rest{number}"] = {
            "ansible_host": f"198.51.100.{number + 1}" if number < 250 else f"203.0.113.{number - 249}",
            "dicomfleet_machine_id": f"rest{number}", "dicomfleet_ae_title": f"REST{number}",
            "dicomfleet_modality": "CT", "dicomfleet_location": "Ward", "dicomfleet_ingest": "agent",
            "dicomfleet_watch_folders": ["/export"]}
    for number in range(dicom):
        scanners[f"dcm{number}"] = {
            "ansible_host": f"192.0.2.{number + 100}", "dicomfleet_machine_id": f"dcm{number}",
            "dicomfleet_ae_title": f"DCM{number}", "dicomfleet_modality": "DX",
            "dicomfleet_location": "Ward", "dicomfleet_ingest": "dicom"}
    document["all"]["children"]["scanners"]["hosts"] = scanners
    path = tmp_path / "fleet.yml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize("rest, dicom, http_threads, dicom_threads", [
    (3, 2, 50, 4),
    (60, 10, 200, 12),
    (10, 100, 50, 64),
])
def test_thread_defaults_sized_by_fleet(tmp_path, rest, dicom, http_threads, dicom_threads):
    site = load_site(_fleet_inventory(tmp_path, rest, dicom))
    settings = render.orthanc_settings(site, site.servers["pacs1"])
    assert (settings["http_threads"], settings["dicom_threads"]) == (http_threads, dicom_threads)


def test_plugin_packages_installed(example_site, secrets):
    plan = render.plan_host(example_site, "pacs1", secrets)
    assert {"orthanc-dicomweb", "orthanc-webviewer", "orthanc-gdcm"} <= set(plan.apt_packages)


@pytest.mark.parametrize("path, section", [
    ("/etc/orthanc/dicomweb.json", "DicomWeb"),
    ("/etc/orthanc/webviewer.json", "WebViewer"),
    ("/etc/orthanc/gdcm.json", "Gdcm"),
])
def test_plugin_configuration_replaces_package_file(example_site, secrets, path, section):
    managed = file_of(render.plan_host(example_site, "pacs1", secrets), path)
    assert (list(json.loads(managed.content)), managed.restarts) == ([section], ("orthanc.service",))


def test_dicomweb_links_point_at_https_front(example_site, secrets):
    managed = file_of(render.plan_host(example_site, "pacs1", secrets), "/etc/orthanc/dicomweb.json")
    settings = json.loads(managed.content)["DicomWeb"]
    assert (settings["Ssl"], settings["Host"]) == (True, "192.0.2.10:443")


def test_unknown_plugin_package_rejected(tmp_path):
    with pytest.raises(InventoryError) as caught:
        load_site(_with_central_vars(tmp_path, {"dicomfleet_orthanc_plugin_packages": ["orthanc-python"]}))
    assert "contains 'orthanc-python'; dicomfleet configures orthanc-dicomweb" in caught.value.problems[0]


def test_no_plugin_packages_by_default(tmp_path):
    site = load_site(LAB)
    plan = render.plan_host(site, "central", credentials.ensure_secrets(site, tmp_path))
    assert [p for p in plan.apt_packages if p.startswith("orthanc-")] == []


def test_orthanc_drop_in_restarts_orthanc(example_site, secrets):
    managed = file_of(render.plan_host(example_site, "pacs1", secrets), archive.ORTHANC_DROP_IN)
    assert managed.restarts == ("orthanc.service",)


def test_orthanc_drop_in_writable_paths(tmp_path):
    path = _with_central_vars(tmp_path, {"dicomfleet_orthanc_storage_directory": "/srv/orthanc/storage"})
    site = load_site(path)
    plan = render.plan_host(site, "pacs1", credentials.ensure_secrets(site, tmp_path / "s"))
    drop_in = file_of(plan, archive.ORTHANC_DROP_IN).content
    assert "ReadWritePaths=/var/lib/orthanc /var/log/orthanc /srv/orthanc/storage\n" in drop_in


def test_privileged_dicom_port_keeps_one_capability(tmp_path):
    site = load_site(_with_central_vars(tmp_path, {"dicomfleet_orthanc_dicom_port": 104}))
    plan = render.plan_host(site, "pacs1", credentials.ensure_secrets(site, tmp_path / "s"))
    drop_in = file_of(plan, archive.ORTHANC_DROP_IN).content
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in drop_in.splitlines()


def _offline_score(root: Path, unit: str) -> float:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={root}", unit],
                            capture_output=True, text=True)
    return float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout).group(1))


# Units whose Debian unit file is on this machine, and dicomfleet's own units.
OFFLINE_UNITS = [
    "orthanc.service", "postgresql.service", "postgresql@15-main.service", "nftables.service",
    "dicomfleet-backup-index.service", "dicomfleet-backup-storage.service", "dicomfleet-firewall.service",
]


@pytest.mark.parametrize("unit", OFFLINE_UNITS)
def test_unit_exposure_at_most_2_offline(tmp_path, unit):
    from test_archive_support import inventory_document

    inventory = tmp_path / "archlab.yml"
    inventory.write_text(yaml.safe_dump(inventory_document()))
    site = load_site(inventory)
    secrets = credentials.ensure_secrets(site, tmp_path / "secrets")
    root = tmp_path / "root"
    for host in ("vault", "db"):
        for managed in render.plan_host(site, host, secrets).files:
            if managed.path.startswith("/etc/systemd/system/"):
                target = root / managed.path.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(managed.content)
    base = unit.replace("@15-main", "@")
    debian_unit = Path("/lib/systemd/system") / base
    if debian_unit.exists():
        (root / "lib/systemd/system").mkdir(parents=True, exist_ok=True)
        shutil.copy(debian_unit, root / "lib/systemd/system" / base)
    assert _offline_score(root, unit) <= 2.0


@pytest.mark.parametrize("schedule_key", ["index_schedule", "storage_schedule"])
def test_backup_schedules_valid(example_site, schedule_key):
    server = example_site.servers["pacs1"]
    context = backup_units.backup_context(example_site, server, render.orthanc_settings(example_site, server))
    result = subprocess.run(["systemd-analyze", "calendar", context[schedule_key]], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_backup_timers_enabled(example_site, secrets):
    plan = render.plan_host(example_site, "pacs1", secrets)
    assert {"dicomfleet-backup-index.timer", "dicomfleet-backup-storage.timer"} <= set(plan.services)


def test_sqlite_index_backup_stops_orthanc(example_site, secrets):
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    plan = render.plan_host(example_site, "pacs1", secrets)
    unit.read_string(file_of(plan, "/etc/systemd/system/dicomfleet-backup-index.service").content)
    assert (unit["Unit"]["Conflicts"], unit["Unit"]["OnSuccess"], unit["Unit"]["OnFailure"]) == (
        "orthanc.service", "orthanc.service", "orthanc.service")


def test_backup_off(tmp_path):
    site = load_site(_with_central_vars(tmp_path, {"dicomfleet_backup": False}))
    plan = render.plan_host(site, "pacs1", credentials.ensure_secrets(site, tmp_path / "s"))
    assert [unit for unit in plan.services if "backup" in unit] == []


def test_bad_backup_schedule_rejected(tmp_path):
    with pytest.raises(InventoryError) as caught:
        load_site(_with_central_vars(tmp_path, {"dicomfleet_backup_index_schedule": "daily; rm -rf /"}))
    assert "dicomfleet_backup_index_schedule" in caught.value.problems[0]


def test_nginx_listens_on_host_address(example_site, secrets):
    site_file = file_of(render.plan_host(example_site, "pacs1", secrets), proxy.FRONT_SITE).content
    assert "    listen 192.0.2.10:443 ssl http2;\n" in site_file


def test_nginx_default_site_removed(example_site, secrets):
    plan = render.plan_host(example_site, "pacs1", secrets)
    assert [removed.path for removed in plan.removed_paths] == [proxy.DEFAULT_SITE]


def test_nginx_allows_firewall_sources_only(example_site, secrets):
    drop_in = file_of(render.plan_host(example_site, "pacs1", secrets), proxy.HARDENING_DROP_IN).content
    # mri1 (198.51.100.21) sends C-STORE, so it reaches nginx only for the dashboard's heartbeats.
    assert "IPAddressAllow=localhost 198.51.100.11 198.51.100.32 203.0.113.0/24 192.0.2.64/27 198.51.100.21\n" \
        in drop_in


def test_tls_off_keeps_plain_orthanc(tmp_path):
    site = load_site(_with_central_vars(tmp_path, {"dicomfleet_tls": False}))
    plan = render.plan_host(site, "pacs1", credentials.ensure_secrets(site, tmp_path / "s"))
    assert ("nginx.service" in plan.services, proxy.public_url(site, site.servers["pacs1"])) == (
        False, "http://192.0.2.10:8042")


def test_same_port_for_two_services_rejected(tmp_path):
    with pytest.raises(InventoryError) as caught:
        load_site(_with_central_vars(tmp_path, {"dicomfleet_https_port": 8042}))
    assert "host pacs1: dicomfleet_https_port: port 8042 is also dicomfleet_orthanc_http_port" in \
        caught.value.problems[0]


def test_dashboard_bind_on_network_rejected_with_tls(tmp_path):
    with pytest.raises(InventoryError) as caught:
        load_site(_with_central_vars(tmp_path, {"dicomfleet_dashboard_bind": "192.0.2.10"}))
    assert "host pacs1: dicomfleet_dashboard_bind: '192.0.2.10' is not a loopback address" in \
        caught.value.problems[0]


def test_dashboard_bind_on_network_accepted_without_tls(tmp_path):
    site = load_site(_with_central_vars(tmp_path, {"dicomfleet_tls": False, "dicomfleet_dashboard_bind": "192.0.2.10"}))
    assert site.servers["pacs1"].vars["dicomfleet_dashboard_bind"] == "192.0.2.10"


def test_dashboard_https_port_collision_rejected(tmp_path):
    with pytest.raises(InventoryError) as caught:
        load_site(_with_central_vars(tmp_path, {"dicomfleet_dashboard_https_port": 443}))
    assert "host pacs1: dicomfleet_dashboard_https_port: port 443 is also dicomfleet_https_port" in \
        caught.value.problems[0]


def test_network_plan_example_current():
    rendered = netplan.render_network_plan(load_site(EXAMPLE))
    assert (ROOT / "docs" / "network-plan-example.md").read_text() == rendered


def test_network_plan_names_vlan_and_subnet():
    text = netplan.render_network_plan(load_site(EXAMPLE))
    assert "| 120 | 198.51.100.0/24 |" in text


def test_network_plan_describes_dicom_rule():
    text = netplan.render_network_plan(load_site(EXAMPLE))
    assert ("- TCP 4242, DICOM to Orthanc, from 198.51.100.12 (ct-room2), 198.51.100.21 (mri1), "
            "198.51.100.31 (xr-room1): C-STORE from the machines registered for DICOM.") in text


def test_network_plan_in_render_output(tmp_path, project_root):
    out = tmp_path / "out"
    subprocess.run([str(project_root / ".venv/bin/dicomfleet"), "render", str(EXAMPLE), str(out)], check=True,
                   capture_output=True)
    assert (out / "pacs1" / archive.NETWORK_PLAN.lstrip("/")).read_text() == \
        netplan.render_network_plan(load_site(EXAMPLE))


# Regions: several independent Orthanc servers, each with its own machines, one MongoDB.

def _regions_inventory(tmp_path: Path, second_name: str = "east") -> Path:
    document = yaml.safe_load(EXAMPLE.read_text())
    central = document["all"]["children"]["central"]["hosts"]
    central["pacs1"]["dicomfleet_orthanc_name"] = "west"
    central["pacs2"] = dict(central["pacs1"], ansible_host="192.0.2.11", dicomfleet_orthanc_name=second_name,
                            dicomfleet_orthanc_aet="EAST_ARCHIVE")
    scanners = document["all"]["children"]["scanners"]["hosts"]
    for name, entry in scanners.items():
        entry["dicomfleet_orthanc"] = "pacs2" if name.startswith("xr") else "pacs1"
    path = tmp_path / "regions.yml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_regions_register_own_dicom_machines(tmp_path):
    site = load_site(_regions_inventory(tmp_path))
    secrets = credentials.ensure_secrets(site, tmp_path / "s")
    modalities = {}
    for host in ("pacs1", "pacs2"):
        config = json.loads(file_of(render.plan_host(site, host, secrets), ORTHANC_JSON).content)
        modalities[host] = sorted(config["DicomModalities"])
    assert modalities == {"pacs1": ["ct-room2", "mri1"], "pacs2": ["xr-room1"]}


def test_regions_users_of_own_machines(tmp_path):
    site = load_site(_regions_inventory(tmp_path))
    secrets = credentials.ensure_secrets(site, tmp_path / "s")
    plan = render.plan_host(site, "pacs2", secrets)
    users = json.loads(file_of(plan, "/etc/orthanc/credentials.json").content)["RegisteredUsers"]
    assert [name for name in users if not name.startswith("dicomfleet-")] == ["xr-room2"]


def test_regions_share_one_mongodb(tmp_path):
    import tomllib

    site = load_site(_regions_inventory(tmp_path))
    secrets = credentials.ensure_secrets(site, tmp_path / "s")
    configs = [tomllib.loads(file_of(render.plan_host(site, host, secrets), "/etc/dicomfleet/sync.toml").content)
               for host in ("pacs1", "pacs2")]
    assert [(c["orthanc"]["name"], c["mongodb"]["uri"]) for c in configs] == [
        ("west", "mongodb://192.0.2.20:27017/?replicaSet=rs0"), ("east", "mongodb://192.0.2.20:27017/?replicaSet=rs0")]


def test_regions_with_one_name_rejected(tmp_path):
    with pytest.raises(InventoryError) as caught:
        load_site(_regions_inventory(tmp_path, second_name="west"))
    assert "host pacs2: dicomfleet_orthanc_name: 'west' is also the name of Orthanc on host pacs1" in \
        caught.value.problems[0]
