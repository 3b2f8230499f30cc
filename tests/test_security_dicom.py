"""DICOM access to Orthanc: only registered AE titles from their registered addresses may store.

Orthanc runs with the configuration rendered from the project's template; two
independent peers knock on it: DCMTK's storescu and echoscu, whose output is
read because their exit status does not tell a rejected store from an accepted
one in every DCMTK version, and pynetdicom, which can bind a chosen source
address on loopback.
"""

from __future__ import annotations

import subprocess

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomfleet import localservers
from dicomfleet.inventory import load_site
from test_archive_support import make_instance

REGISTERED_ADDRESS = "127.0.0.1"
OTHER_ADDRESS = "127.0.10.139"

# DICOM status 0x0000: Success (PS3.7 Annex C).
STATUS_SUCCESS = 0x0000


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("security-dicom")
    machines = [
        # dx1 sends from the control machine's default source address.
        {"name": "dx1", "ansible_host": REGISTERED_ADDRESS, "dicomfleet_machine_id": "dx1",
         "dicomfleet_ae_title": "DX_ROOM1", "dicomfleet_modality": "DX",
         "dicomfleet_location": "Room 1", "dicomfleet_ingest": "dicom"},
        # dx2 is registered at another address than the one the control machine sends from.
        {"name": "dx2", "ansible_host": OTHER_ADDRESS, "dicomfleet_machine_id": "dx2",
         "dicomfleet_ae_title": "DX_ROOM2", "dicomfleet_modality": "DX",
         "dicomfleet_location": "Room 2", "dicomfleet_ingest": "dicom"},
    ]
    inventory = localservers.write_local_inventory(folder, machines)
    server = localservers.OrthancProcess(load_site(inventory), folder).start()
    instance = folder / "instance.dcm"
    instance.write_bytes(make_instance())
    yield {"server": server, "port": server.server.dicom_port, "aet": server.server.aet, "file": instance}
    server.stop()


def _storescu(orthanc, calling_aet: str) -> str:
    result = subprocess.run(
        ["storescu", "-v", "-aet", calling_aet, "-aec", orthanc["aet"], "127.0.0.1", str(orthanc["port"]),
         str(orthanc["file"])],
        capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def _echoscu(orthanc, calling_aet: str) -> str:
    result = subprocess.run(
        ["echoscu", "-v", "-aet", calling_aet, "-aec", orthanc["aet"], "127.0.0.1", str(orthanc["port"])],
        capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def _pynetdicom_store(orthanc, calling_aet: str, source: str) -> int | None:
    """Return the C-STORE status, or None when the association was rejected or aborted."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    association = ae.associate("127.0.0.1", orthanc["port"], ae_title=orthanc["aet"], bind_address=(source, 0))
    if not association.is_established:
        return None
    try:
        status = association.send_c_store(str(orthanc["file"]))
    finally:
        association.release()
    return int(status.Status) if status else None


def _pynetdicom_echo(orthanc, calling_aet: str, source: str) -> bool:
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", orthanc["port"], ae_title=orthanc["aet"], bind_address=(source, 0))
    established = association.is_established
    if established:
        association.release()
    return established


def test_storescu_registered_ae_accepted(orthanc):
    output = _storescu(orthanc, "DX_ROOM1")
    assert "Received Store Response (Success)" in output


def test_storescu_unregistered_ae_rejected(orthanc):
    output = _storescu(orthanc, "INTRUDER")
    assert "Association Rejected" in output


def test_storescu_registered_ae_wrong_address_rejected(orthanc):
    output = _storescu(orthanc, "DX_ROOM2")
    assert "Association Rejected" in output


def test_echoscu_registered_ae_accepted(orthanc):
    output = _echoscu(orthanc, "DX_ROOM1")
    assert "Received Echo Response (Success)" in output


def test_echoscu_unregistered_ae_rejected(orthanc):
    output = _echoscu(orthanc, "INTRUDER")
    assert "Association Rejected" in output


def test_pynetdicom_registered_pair_accepted(orthanc):
    assert _pynetdicom_store(orthanc, "DX_ROOM2", OTHER_ADDRESS) == STATUS_SUCCESS


def test_pynetdicom_registered_ae_wrong_address_rejected(orthanc):
    assert _pynetdicom_store(orthanc, "DX_ROOM1", OTHER_ADDRESS) is None


def test_pynetdicom_unregistered_ae_rejected(orthanc):
    assert _pynetdicom_store(orthanc, "INTRUDER", REGISTERED_ADDRESS) is None


def test_pynetdicom_echo_wrong_address_rejected(orthanc):
    assert _pynetdicom_echo(orthanc, "DX_ROOM2", REGISTERED_ADDRESS) is False


def test_rejected_peers_stored_nothing(orthanc):
    # Only dx1 (storescu) and dx2 (pynetdicom, right address) stored, and both sent the same instance.
    _storescu(orthanc, "INTRUDER")
    assert orthanc["server"].get("/statistics")["CountInstances"] == 1
