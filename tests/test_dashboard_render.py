"""What the deploy renders for the dashboard: its configuration, unit, secrets and Prometheus alert rules."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from dicomfleet import credentials, render, tls
from dicomfleet.dashboard import rollout
from dicomfleet.dashboard.config import parse_config
from dicomfleet.dashboard.heartbeats import token_digest
from dicomfleet.inventory import load_site

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "inventory" / "lab.yml"
EXAMPLE = ROOT / "inventory" / "example-hospital.yml"


@pytest.fixture
def example(tmp_path):
    site = load_site(EXAMPLE)
    secrets = credentials.ensure_secrets(site, tmp_path / "secrets")
    return site, secrets, render.plan_host(site, "pacs1", secrets)


def _file(plan: render.HostPlan, path: str) -> render.ManagedFile:
    (managed,) = [item for item in plan.files if item.path == path]
    return managed


def _with_hours(tmp_path: Path) -> Path:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["all"]["vars"]["dicomfleet_timezone"] = "Europe/Paris"
    scanners = document["all"]["children"]
    for group in scanners.values():
        for name, host in (group.get("hosts") or {}).items():
            if name == "mri1":
                host["dicomfleet_working_hours"] = "Mon-Fri 07:00-19:00, Sat 08:00-12:00"
                host["dicomfleet_silent_after_minutes"] = 45
            if name == "xr-room1":
                host["dicomfleet_working_hours"] = "never"
    path = tmp_path / "hours.yml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_dashboard_service_planned(example):
    _, _, plan = example
    assert rollout.UNIT in plan.services
    assert rollout.SERVICE_USER in plan.users


def test_dashboard_config_parses(example):
    _, _, plan = example
    config = parse_config(_file(plan, rollout.CONFIG_PATH).content, Path("dashboard.toml"))
    assert [machine.id for machine in config.machines] == ["ct-room1", "ct-room2", "mri1", "xr-room1", "xr-room2"]
    assert config.orthanc.username == credentials.DASHBOARD_USER
    assert config.orthanc.url == "http://127.0.0.1:8042"


def test_dashboard_config_stores_token_digest_only(example):
    _, secrets, plan = example
    content = _file(plan, rollout.CONFIG_PATH).content
    token = secrets.heartbeat_token("ct-room1")
    assert token not in content
    assert token_digest(token) in content


def test_dashboard_config_no_token_for_dicom_machine(example):
    _, _, plan = example
    machines = tomllib.loads(_file(plan, rollout.CONFIG_PATH).content)["machine"]
    (ct_room2,) = [machine for machine in machines if machine["id"] == "ct-room2"]
    assert ct_room2["token_sha256"] == ""


@pytest.mark.parametrize("path", [
    "/etc/dicomfleet/credentials/dashboard-login.password",
    "/etc/dicomfleet/credentials/dashboard-session.key",
    "/etc/dicomfleet/credentials/orthanc-dashboard.password",
])
def test_dashboard_secret_files_private(example, path):
    _, _, plan = example
    managed = _file(plan, path)
    assert (managed.mode, managed.owner, managed.secret) == ("0600", "root", True)


def test_dashboard_unit_loads_credentials(example):
    _, _, plan = example
    unit = _file(plan, "/etc/systemd/system/dicomfleet-dashboard.service").content
    assert "LoadCredential=dashboard-login:/etc/dicomfleet/credentials/dashboard-login.password" in unit
    assert "User=dicomfleet-dashboard" in unit


def test_dashboard_orthanc_user_registered(example):
    _, secrets, plan = example
    users = yaml.safe_load(_file(plan, "/etc/orthanc/credentials.json").content)["RegisteredUsers"]
    assert users[credentials.DASHBOARD_USER] == secrets.orthanc_password(credentials.DASHBOARD_USER)


def test_dashboard_unit_exposure_at_most_2(tmp_path):
    site = load_site(LAB)
    plan = render.plan_host(site, "central", credentials.ensure_secrets(site, tmp_path / "s"))
    path = tmp_path / "dicomfleet-dashboard.service"
    path.write_text(_file(plan, "/etc/systemd/system/dicomfleet-dashboard.service").content)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)],
                            capture_output=True, text=True)
    score = float(result.stdout.split("Overall exposure level for")[1].split(":")[1].split()[0])
    assert score <= 2.0


def test_dashboard_listens_on_central_address(tmp_path):
    site = load_site(LAB)
    plan = render.plan_host(site, "central", credentials.ensure_secrets(site, tmp_path / "s"))
    config = tomllib.loads(_file(plan, rollout.CONFIG_PATH).content)
    assert config["dashboard"]["listen"] == "127.0.10.1"
    assert config["dashboard"]["port"] == 8050


def test_dashboard_listens_on_loopback_behind_nginx(example):
    _, _, plan = example
    config = tomllib.loads(_file(plan, rollout.CONFIG_PATH).content)
    assert config["dashboard"]["listen"] == "127.0.0.1"


def test_nginx_serves_dashboard_on_central_address(example):
    _, _, plan = example
    assert "    listen 192.0.2.10:8443 ssl http2;\n" in _file(plan, rollout.NGINX_SITE).content


def test_nginx_passes_dashboard_requests_to_loopback(example):
    _, _, plan = example
    assert "        proxy_pass http://127.0.0.1:8050;\n" in _file(plan, rollout.NGINX_SITE).content


def test_agent_sends_heartbeats_over_https(example):
    site, secrets, _ = example
    agent = tomllib.loads(_file(render.plan_host(site, "ct-room1", secrets), "/etc/dicomfleet/agent.toml").content)
    assert agent["heartbeat"]["url"] == "https://192.0.2.10:8443/api/v1/heartbeats"


def test_agent_checks_dashboard_with_site_ca(example):
    site, secrets, _ = example
    agent = tomllib.loads(_file(render.plan_host(site, "ct-room1", secrets), "/etc/dicomfleet/agent.toml").content)
    assert agent["heartbeat"]["ca_file"] == "/etc/dicomfleet/tls/site-ca.pem"


def test_cstore_agent_host_gets_site_ca_for_heartbeats(example):
    site, secrets, _ = example
    plan = render.plan_host(site, "mri1", secrets)
    assert _file(plan, "/etc/dicomfleet/tls/site-ca.pem").content == tls.ca_certificate(site, secrets)


def _without_tls(tmp_path: Path):
    document = yaml.safe_load(EXAMPLE.read_text())
    document["all"]["children"]["central"]["hosts"]["pacs1"]["dicomfleet_tls"] = False
    path = tmp_path / "plain.yml"
    path.write_text(yaml.safe_dump(document))
    site = load_site(path)
    secrets = credentials.ensure_secrets(site, tmp_path / "secrets")
    return site, secrets


def test_dashboard_without_tls_listens_on_central_address(tmp_path):
    site, secrets = _without_tls(tmp_path)
    config = tomllib.loads(_file(render.plan_host(site, "pacs1", secrets), rollout.CONFIG_PATH).content)
    assert config["dashboard"]["listen"] == "192.0.2.10"


def test_dashboard_without_tls_has_no_nginx_site(tmp_path):
    site, secrets = _without_tls(tmp_path)
    plan = render.plan_host(site, "pacs1", secrets)
    assert [item.path for item in plan.files if item.path == rollout.NGINX_SITE] == []


def test_agent_heartbeats_without_tls_use_plain_port(tmp_path):
    site, secrets = _without_tls(tmp_path)
    agent = tomllib.loads(_file(render.plan_host(site, "ct-room1", secrets), "/etc/dicomfleet/agent.toml").content)
    assert agent["heartbeat"] == {"url": "http://192.0.2.10:8050/api/v1/heartbeats", "interval_s": 30.0}


def test_dashboard_working_hours_rendered(tmp_path):
    site = load_site(_with_hours(tmp_path))
    plan = render.plan_host(site, "pacs1", credentials.ensure_secrets(site, tmp_path / "s"))
    config = parse_config(_file(plan, rollout.CONFIG_PATH).content, Path("dashboard.toml"))
    assert config.timezone == "Europe/Paris"
    mri1 = config.machine("mri1")
    assert mri1.working_hours.text == "Mon-Fri 07:00-19:00, Sat 08:00-12:00"
    assert mri1.silent_after_s == 45 * 60


def test_alert_rules_one_silent_rule_per_watched_machine(tmp_path):
    site = load_site(_with_hours(tmp_path))
    plan = render.plan_host(site, "pacs1", credentials.ensure_secrets(site, tmp_path / "s"))
    rules = yaml.safe_load(_file(plan, rollout.ALERT_RULES_PATH).content)
    silent = [rule for group in rules["groups"] for rule in group["rules"] if rule["alert"] == "DicomfleetMachineSilent"]
    assert sorted(rule["labels"]["machine"] for rule in silent) == ["ct-room1", "ct-room2", "mri1", "xr-room2"]
    (mri1,) = [rule for rule in silent if rule["labels"]["machine"] == "mri1"]
    assert 'dicomfleet_machine_idle_working_seconds{machine="mri1"} > 2700' in mri1["expr"]
    assert "Mon-Fri 07:00-19:00, Sat 08:00-12:00" in mri1["annotations"]["description"]


@pytest.mark.parametrize("alert", [
    "DicomfleetAgentDown", "DicomfleetQueueGrowing", "DicomfleetFilesFailing", "DicomfleetQuarantineGrowing",
    "DicomfleetOrthancDiskFull", "DicomfleetSyncBehind", "DicomfleetMachineSilent", "DicomfleetOrthancDown",
])
def test_alert_rules_cover(example, alert):
    _, _, plan = example
    rules = yaml.safe_load(_file(plan, rollout.ALERT_RULES_PATH).content)
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert alert in names


def test_alert_rules_valid_for_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (the Makefile does).")
    site = load_site(_with_hours(tmp_path))
    plan = render.plan_host(site, "pacs1", credentials.ensure_secrets(site, tmp_path / "s"))
    path = tmp_path / "dicomfleet-alerts.yml"
    path.write_text(_file(plan, rollout.ALERT_RULES_PATH).content)
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Ten site-wide rules and one silent-machine rule for each of the four machines with working hours.
    assert "SUCCESS: 14 rules found" in result.stdout


def test_alert_rules_fire_in_promtool(tmp_path):
    """Feed promtool a silent machine and a full disk, and check which alerts fire."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (the Makefile does).")
    site = load_site(_with_hours(tmp_path))
    plan = render.plan_host(site, "pacs1", credentials.ensure_secrets(site, tmp_path / "s"))
    (tmp_path / "rules.yml").write_text(_file(plan, rollout.ALERT_RULES_PATH).content)
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'dicomfleet_machine_idle_working_seconds{machine="mri1"}', "values": "3000+60x20"},
                {"series": 'dicomfleet_machine_in_working_hours{machine="mri1"}', "values": "1x20"},
                {"series": 'dicomfleet_machine_idle_working_seconds{machine="ct-room1"}', "values": "60x20"},
                {"series": 'dicomfleet_machine_in_working_hours{machine="ct-room1"}', "values": "1x20"},
                {"series": "dicomfleet_orthanc_disk_used_ratio", "values": "0.9x20"},
                {"series": 'dicomfleet_agent_up{machine="ct-room1"}', "values": "1 1 1 0x17"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "DicomfleetMachineSilent", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "site": "example-hospital", "machine": "mri1"},
                    "exp_annotations": {
                        "summary": "Machine mri1 (Main building, level -1, MRI suite) sent no image for 45 working minutes",
                        "description": "Working hours Mon-Fri 07:00-19:00, Sat 08:00-12:00. See 'A machine is "
                                       "silent' in docs/operations.md."},
                }]},
                {"eval_time": "15m", "alertname": "DicomfleetOrthancDiskFull", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "site": "example-hospital"},
                    "exp_annotations": {
                        "summary": "Orthanc's storage disk is 90% full",
                        "description": "Above 85 % of the disk holding /var/lib/orthanc/db-v6 is used; see "
                                       "'Orthanc's disk fills' in docs/operations.md."},
                }]},
                {"eval_time": "10m", "alertname": "DicomfleetAgentDown", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "site": "example-hospital", "machine": "ct-room1"},
                    "exp_annotations": {"summary": "The agent of machine ct-room1 sends no heartbeat",
                                        "description": "See 'A machine is offline' in docs/operations.md."},
                }]},
                {"eval_time": "10m", "alertname": "DicomfleetSyncBehind", "exp_alerts": []},
            ],
        }],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    result = subprocess.run([promtool, "test", "rules", "test.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
