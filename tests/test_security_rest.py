"""REST access to Orthanc: credentials required, each machine's own, and revoked with the machine.

A real Orthanc runs with the configuration rendered from the inventory; a machine
removed from the inventory loses its user when the configuration is rendered again.
"""

from __future__ import annotations

import pytest
import requests

from dicomfleet import credentials, localservers
from dicomfleet.inventory import load_site


def _machine(name: str, address: str) -> dict:
    return {"name": name, "ansible_host": address, "dicomfleet_machine_id": name,
            "dicomfleet_ae_title": name.upper(), "dicomfleet_modality": "CT",
            "dicomfleet_location": f"Room {name}", "dicomfleet_ingest": "agent",
            "dicomfleet_watch_folders": ["/srv/export"]}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("security-rest")
    machines = [_machine("ct1", "127.0.10.131"), _machine("ct2", "127.0.10.132")]
    central = {"dicomfleet_tls": False}
    inventory = localservers.write_local_inventory(folder, machines, central=central)
    server = localservers.OrthancProcess(load_site(inventory), folder).start()
    state = {"server": server, "folder": folder, "machines": machines, "central": central}
    yield state
    # A test may have replaced the server with one started from a new configuration.
    state["server"].stop()


def _status(orthanc, auth) -> int:
    return requests.get(f"{orthanc['server'].url}/system", auth=auth, timeout=10).status_code


def test_no_credentials_401(orthanc):
    assert _status(orthanc, None) == 401


def test_wrong_password_401(orthanc):
    assert _status(orthanc, ("ct1", "wrong")) == 401


def test_unknown_user_401(orthanc):
    assert _status(orthanc, ("intruder", orthanc["server"].auth_of("ct1")[1])) == 401


def test_other_machines_password_401(orthanc):
    assert _status(orthanc, ("ct1", orthanc["server"].auth_of("ct2")[1])) == 401


def test_machine_own_password_200(orthanc):
    assert _status(orthanc, orthanc["server"].auth_of("ct1")) == 200


@pytest.mark.parametrize("user", [credentials.SYNC_USER, credentials.ADMIN_USER])
def test_service_users_200(orthanc, user):
    assert _status(orthanc, orthanc["server"].auth_of(user)) == 200


def test_removed_machine_rejected_after_new_configuration(orthanc):
    server = orthanc["server"]
    removed = server.auth_of("ct2")
    kept = server.auth_of("ct1")
    server.stop()

    inventory = localservers.write_local_inventory(orthanc["folder"], orthanc["machines"][:1], central={
        **orthanc["central"],
        "dicomfleet_orthanc_http_port": server.server.http_port,
        "dicomfleet_orthanc_dicom_port": server.server.dicom_port,
    })
    renewed = localservers.OrthancProcess(load_site(inventory), orthanc["folder"]).start()
    orthanc["server"] = renewed
    assert (_status(orthanc, removed), _status(orthanc, kept)) == (401, 200)
