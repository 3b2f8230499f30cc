"""The site's secret files: generated once, reused, and an ansible-vault file rejected by the pyinfra path."""

from __future__ import annotations

import pytest

from dicomfleet import credentials, deployment, localservers, wheelhouse
from dicomfleet.inventory import load_site

ENCRYPTED = "$ANSIBLE_VAULT;1.1;AES256\n3133356664396131\n"


@pytest.fixture
def local_site(tmp_path):
    """A loopback-only site with one agent machine, and its secrets folder."""
    inventory = localservers.write_local_inventory(tmp_path, [{
        "name": "ct1", "ansible_host": "127.0.0.1", "dicomfleet_machine_id": "ct1",
        "dicomfleet_ae_title": "CT1", "dicomfleet_modality": "CT", "dicomfleet_ingest": "agent",
        "dicomfleet_location": "CT room 1",
        "dicomfleet_watch_folders": [str(tmp_path / "export")],
    }])
    return inventory, tmp_path / "secrets"


def test_secret_generated_then_reused(local_site):
    inventory, folder = local_site
    site = load_site(inventory)
    first = credentials.ensure_secrets(site, folder).orthanc_password("ct1")
    second = credentials.existing_secrets(site, folder).orthanc_password("ct1")
    assert first == second


def test_vault_secret_rejected_naming_file(local_site):
    inventory, folder = local_site
    site = load_site(inventory)
    folder.mkdir(mode=0o700)
    (folder / "orthanc-ct1.password").write_text(ENCRYPTED)
    with pytest.raises(credentials.SecretError) as caught:
        credentials.existing_secrets(site, folder).orthanc_password("ct1")
    assert str(folder / "orthanc-ct1.password") in str(caught.value)


def test_vault_secret_stops_deploy_before_hosts(local_site, monkeypatch, capsys):
    inventory, folder = local_site
    site = load_site(inventory)
    secrets_folder = folder / site.name
    secrets_folder.mkdir(parents=True, mode=0o700)
    (secrets_folder / "orthanc-ct1.password").write_text(ENCRYPTED)
    monkeypatch.setenv("DICOMFLEET_SECRETS_DIR", str(folder))
    built = []
    # The wheelhouse is built just before pyinfra starts, so it must never be reached.
    monkeypatch.setattr(wheelhouse, "build", lambda: built.append(True))

    status = deployment.main([str(inventory)])

    assert status == 1
    assert built == []
    assert "encrypted with ansible-vault" in capsys.readouterr().err
