"""Unit tests of the agent configuration: the rendered template loads, and every bad key or value is named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent_support import AgentSite
from dicomfleet.agent.config import ConfigError, load_config, parse_config
from dicomfleet.agent.password import PasswordError, read_password

VALID = """
[agent]
spool = "/var/lib/dicomfleet-agent/spool.sqlite3"
quarantine = "/var/lib/dicomfleet-agent/quarantine"
status_file = "/var/lib/dicomfleet-agent/status.json"
rescan_interval_s = 60
quiet_time_s = 2.0
workers = 4

[[machine]]
id = "ct1"
ae_title = "CT_ROOM1"
modality = "CT"
transport = "rest"
watch_folders = ["/srv/dicom/export"]
polling = false
orthanc_url = "http://127.0.0.1:8042"
orthanc_aet = "ORTHANC"
orthanc_dicom_port = 4242
username = "ct1"
credential = "orthanc-ct1"
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("/etc/dicomfleet/agent.toml"))
    return caught.value.problems


def test_config_loads_rendered_template(tmp_path):
    site = AgentSite(tmp_path)
    path = site.write_config()

    config = load_config(path)

    assert [machine.id for machine in config.machines] == ["ct1"]
    machine = config.machines[0]
    assert machine.watch_folders == (str(site.watch),)
    assert machine.polling is False
    assert machine.transport == "rest"
    assert machine.orthanc_url == site.orthanc.url
    assert machine.password_file == str(site.password_file)
    assert config.quiet_time_s == 0.5
    assert config.workers == 2


def test_config_defaults_optional_agent_keys():
    text = VALID.replace("rescan_interval_s = 60\n", "").replace("workers = 4\n", "")

    config = parse_config(text, Path("agent.toml"))

    assert config.rescan_interval_s == 60.0
    assert config.workers == 4


@pytest.mark.parametrize("old, new, expected", [
    ("workers = 4", "workers = 0", "[agent]: workers = 0 must be a whole number from 1 to 64"),
    ("quiet_time_s = 2.0", "quiet_time_s = -1", "quiet_time_s = -1 must be a number above 0"),
    ('spool = "/var/lib', 'spool = "var/lib', "spool = 'var/lib/dicomfleet-agent/spool.sqlite3' must be an absolute path"),
    ("workers = 4", "workers = 4\nthreads = 2", "[agent]: unknown key 'threads'"),
    ('ae_title = "CT_ROOM1"', 'ae_title = "CT\\\\ROOM"', "[[machine]] ct1: ae_title = 'CT\\\\ROOM' contains a backslash"),
    ('modality = "CT"', 'modality = "XX"', "modality = 'XX' is not a DICOM modality defined term"),
    ('orthanc_url = "http://127.0.0.1:8042"', 'orthanc_url = "ftp://127.0.0.1"', "orthanc_url = 'ftp://127.0.0.1' must be an http"),
    ("orthanc_dicom_port = 4242", "orthanc_dicom_port = 70000", "orthanc_dicom_port = 70000 must be a TCP port"),
    ('watch_folders = ["/srv/dicom/export"]', 'watch_folders = ["export"]', "contains 'export', which is not an absolute path"),
    ("polling = false", 'polling = "no"', "polling = 'no' must be true or false"),
    ('credential = "orthanc-ct1"', 'credential = "../etc/passwd"', "credential = '../etc/passwd' must be a systemd credential name"),
    ('username = "ct1"\n', "", "[[machine]] ct1: the key 'username' is missing"),
    ('id = "ct1"', 'id = "CT 1"', "id = 'CT 1' must be 1 to 32 characters"),
    ("polling = false", "polling = false\nsecret = 1", "[[machine]] ct1: unknown key 'secret'"),
    ("polling = false", 'polling = false\nca_file = "ca.pem"', "ca_file = 'ca.pem' must be an absolute path"),
])
def test_config_names_file_key_and_value(old, new, expected):
    assert old in VALID

    problems = _problems(VALID.replace(old, new, 1))

    assert len(problems) == 1
    assert problems[0].startswith("/etc/dicomfleet/agent.toml: ")
    assert expected in problems[0]


def test_config_accepts_cstore_transport():
    config = parse_config(VALID.replace('transport = "rest"', 'transport = "cstore"'), Path("agent.toml"))

    assert config.machines[0].transport == "cstore"
    assert config.machines[0].dicom_host == "127.0.0.1"


def test_config_archive_needs_folder():
    problems = _problems(VALID.replace('transport = "rest"', 'transport = "rest"\nafter_send = "archive"'))

    assert len(problems) == 1
    assert "after_send = 'archive' needs archive_folder" in problems[0]
    assert "machine 'ct1'" in problems[0]


def test_config_rejects_archive_inside_watch_folder():
    text = VALID.replace('transport = "rest"',
                         'transport = "rest"\nafter_send = "archive"\narchive_folder = "/srv/dicom/export/done"')

    problems = _problems(text)

    assert len(problems) == 1
    assert "overlaps the watch folder" in problems[0]


def test_config_rejects_unknown_after_send():
    problems = _problems(VALID.replace('transport = "rest"', 'transport = "rest"\nafter_send = "move"'))

    assert len(problems) == 1
    assert "after_send = 'move' must be 'keep', 'archive', 'delete'" in problems[0]


def test_config_rejects_folder_watched_twice():
    second = VALID.split("[[machine]]")[1].replace('id = "ct1"', 'id = "mr1"').replace("CT_ROOM1", "MR_ROOM1")

    problems = _problems(VALID + "\n[[machine]]" + second)

    assert len(problems) == 1
    assert "'/srv/dicom/export' of machine 'mr1' is also watched for machine 'ct1'" in problems[0]


def test_config_rejects_missing_machines():
    text = VALID.split("[[machine]]")[0] + "\n[extra]\nkey = 1\n"

    problems = _problems(text)

    assert any("unknown top-level key or table 'extra'" in problem for problem in problems)
    assert any("no [[machine]] table" in problem for problem in problems)


def test_config_rejects_invalid_toml():
    problems = _problems("[agent\nspool = 1")

    assert problems[0].startswith("/etc/dicomfleet/agent.toml: invalid TOML")


def test_password_prefers_systemd_credential(tmp_path, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "orthanc-ct1").write_text("from-systemd\n")
    fallback = tmp_path / "fallback"
    fallback.write_text("from-file\n")
    text = VALID + f'password_file = "{fallback}"\n'
    machine = parse_config(text, tmp_path / "agent.toml").machines[0]

    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert read_password(machine) == "from-systemd"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert read_password(machine) == "from-file"


def test_password_missing_names_credential(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    machine = parse_config(VALID, tmp_path / "agent.toml").machines[0]

    with pytest.raises(PasswordError) as caught:
        read_password(machine)

    assert "machine 'ct1'" in str(caught.value)
    assert "LoadCredential=orthanc-ct1" in str(caught.value)


def test_agent_exits_2_on_bad_config(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(VALID.replace("workers = 4", "workers = 100"))

    result = subprocess.run([sys.executable, "-m", "dicomfleet", "agent", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert f"{path}: [agent]: workers = 100 must be a whole number from 1 to 64." in result.stderr
    assert "The agent did not start" in result.stderr


def test_agent_exits_2_on_missing_ca_file(tmp_path):
    password = tmp_path / "password"
    password.write_text("secret\n")
    path = tmp_path / "agent.toml"
    path.write_text(VALID + f'password_file = "{password}"\nca_file = "{tmp_path / "absent-ca.pem"}"\n')

    result = subprocess.run([sys.executable, "-m", "dicomfleet", "agent", "--config", str(path)],
                            capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"})

    assert result.returncode == 2
    assert "absent-ca.pem" in result.stderr
    assert "of machine 'ct1' is not a file" in result.stderr
