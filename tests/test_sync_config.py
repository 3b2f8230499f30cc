"""Tests of the sync's configuration: the rendered template loads, bad keys and values are rejected.

No server runs here; the configuration comes from the project's own template.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from dicomfleet import localservers, render
from dicomfleet.credentials import ensure_secrets
from dicomfleet.inventory import load_site
from dicomfleet.sync.config import ConfigError, load_config, parse_config
from dicomfleet.sync.store import redact_uri, write_concern_for

from test_sync_support import MACHINES


@pytest.fixture
def rendered(tmp_path):
    """Return the text of sync.toml rendered from a local inventory, with a password_file line."""
    inventory = localservers.write_local_inventory(tmp_path, MACHINES)
    site = load_site(inventory)
    server = next(iter(site.servers.values()))
    context = render.server_context(site, server, ensure_secrets(site, tmp_path / "secrets"))
    text = render.render_template("sync.toml.j2", context)
    password_file = tmp_path / "sync-password"
    password_file.write_text("s3cret-sync-password\n")
    return text.replace('credential = "orthanc-sync"\n',
                        f'credential = "orthanc-sync"\npassword_file = "{password_file}"\n')


def write(tmp_path, text):
    path = tmp_path / "sync.toml"
    path.write_text(text)
    return path


def problems_of(tmp_path, text) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return caught.value.problems


def test_config_rendered_template_loads(tmp_path, rendered):
    config = load_config(write(tmp_path, rendered))

    assert config.orthanc.name == "local"
    assert config.orthanc.username == "dicomfleet-sync"
    assert config.orthanc.credential == "orthanc-sync"
    assert config.mongodb.database == "dicomfleet"
    assert config.records.patient_id_policy == "dicom"
    assert config.records.patient_id_placeholder == "NA"
    assert config.records.on_delete == "mark"
    assert config.reconcile_interval_s == 900.0
    assert [machine.id for machine in config.machines] == ["ct1", "mr1", "us1"]
    assert config.machines[2].ae_title == "US1"


def test_config_unknown_key_names_file_key_and_value(tmp_path, rendered):
    text = rendered.replace('[records]\n', '[records]\npatient_id_polcy = "dicom"\n')

    problems = problems_of(tmp_path, text)

    assert len(problems) == 1
    assert str(tmp_path / "sync.toml") in problems[0]
    assert "[records] patient_id_polcy: unknown key" in problems[0]


def test_config_bad_value_names_key_and_value(tmp_path, rendered):
    text = rendered.replace('patient_id_policy = "dicom"', 'patient_id_policy = "hash"')

    problems = problems_of(tmp_path, text)

    assert len(problems) == 1
    assert "[records] patient_id_policy: 'hash' is not one of 'dicom', 'placeholder'" in problems[0]


def test_config_on_delete_accepts_remove(tmp_path, rendered):
    text = rendered.replace('on_delete = "mark"\n', 'on_delete = "remove"\n')

    config = load_config(write(tmp_path, text))

    assert config.records.on_delete == "remove"


def test_config_on_delete_rejects_other_value(tmp_path, rendered):
    text = rendered.replace('on_delete = "mark"\n', 'on_delete = "purge"\n')

    problems = problems_of(tmp_path, text)

    assert "[records] on_delete: 'purge' is not one of 'mark', 'remove'" in problems[0]


def test_config_reconcile_interval(tmp_path, rendered):
    config = load_config(write(tmp_path, rendered.replace("interval_s = 900\n", "interval_s = 0\n")))

    assert config.reconcile_interval_s == 0.0


def test_config_unknown_table(tmp_path, rendered):
    problems = problems_of(tmp_path, rendered + "\n[agent]\nworkers = 2\n")

    assert len(problems) == 1
    assert "[agent]: unknown table" in problems[0]


def test_config_several_problems_reported_together(tmp_path, rendered):
    text = rendered.replace('uri = "mongodb://', 'uri = "postgres://')
    text = text.replace('ae_title = "MR1"', 'ae_title = "CT1"')
    text = text.replace('modality = "US"', 'modality = "ULTRASOUND"')

    problems = problems_of(tmp_path, text)

    assert len(problems) == 3
    assert any("[mongodb] uri: 'postgres://" in problem for problem in problems)
    assert any("[[machine]] number 2 ae_title: 'CT1' is also used by [[machine]] number 1" in problem
               for problem in problems)
    assert any("[[machine]] number 3 modality: 'ULTRASOUND'" in problem for problem in problems)


def test_config_missing_table(tmp_path, rendered):
    text = rendered.split("[mongodb]")[0]

    problems = problems_of(tmp_path, text)

    assert any("[mongodb]: missing" in problem for problem in problems)


def test_config_invalid_toml(tmp_path):
    problems = problems_of(tmp_path, "[orthanc\nname = 1\n")

    assert problems[0].startswith(f"{tmp_path / 'sync.toml'}: invalid TOML")


def test_config_missing_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.toml")

    assert "cannot read the sync configuration" in caught.value.problems[0]


def test_password_from_password_file(tmp_path, rendered, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config = load_config(write(tmp_path, rendered))

    assert config.orthanc.read_password() == "s3cret-sync-password"


def test_password_credential_wins_over_file(tmp_path, rendered, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "orthanc-sync").write_text("from-systemd\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    config = load_config(write(tmp_path, rendered))

    assert config.orthanc.read_password() == "from-systemd"


def test_password_missing_names_credential(tmp_path, rendered, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    text = "\n".join(line for line in rendered.splitlines() if not line.startswith("password_file"))
    config = load_config(write(tmp_path, text))

    with pytest.raises(ConfigError) as caught:
        config.orthanc.read_password()

    assert "LoadCredential=orthanc-sync" in caught.value.problems[0]


def test_parse_config_empty_machine_list(tmp_path, rendered):
    text = rendered.split("[[machine]]")[0]

    config = parse_config(text, tmp_path / "sync.toml")

    assert config.machines == ()


def test_write_concern_majority_for_replica_set():
    concern = write_concern_for("mongodb://db1.example:27017,db2.example:27017/?replicaSet=rs0")

    assert concern is not None
    assert concern.document == {"w": "majority"}


def test_write_concern_default_without_replica_set():
    assert write_concern_for("mongodb://127.0.0.1:27017/") is None


def test_write_concern_uri_w_option_kept():
    assert write_concern_for("mongodb://127.0.0.1:27017/?replicaSet=rs0&w=1") is None


def test_redact_uri_hides_password():
    redacted = redact_uri("mongodb://sync:hunter2@127.0.0.1:27017/dicomfleet?replicaSet=rs0")

    assert redacted == "mongodb://sync:***@127.0.0.1:27017/dicomfleet?replicaSet=rs0"


def test_redact_uri_without_user_information():
    assert redact_uri("mongodb://127.0.0.1:27017/") == "mongodb://127.0.0.1:27017/"


def test_service_rejects_invalid_config(tmp_path, rendered):
    path = write(tmp_path, rendered.replace('name = "local"', 'name = "local"\nnames = "typo"'))

    result = subprocess.run([sys.executable, "-m", "dicomfleet", "sync", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert f"{path}: [orthanc] names: unknown key" in result.stderr
