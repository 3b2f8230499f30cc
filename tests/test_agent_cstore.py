"""Tests of the agent's C-STORE transport against a real Orthanc, checked over REST and with DCMTK.

The machine's AE title is registered in Orthanc's DicomModalities with the address
127.0.0.1, as the project's orthanc.json template renders it for a cstore machine.
"""

from __future__ import annotations

import subprocess

import pydicom
import pytest
import requests

from agent_support import MACHINE_ID, AgentSite, make_instance, sop_instance_uid, wait_until
from dicomfleet.agent import cstore

AE_TITLE = "CT_ROOM1"


@pytest.fixture(scope="module")
def cstore_site(tmp_path_factory):
    site = AgentSite(tmp_path_factory.mktemp("agent-cstore"), {"dicomfleet_transport": "cstore"})
    site.orthanc.start()
    yield site
    site.stop_all()


@pytest.fixture
def site(cstore_site):
    cstore_site.reset()
    yield cstore_site
    cstore_site.stop_agents()


def _metadata(site: AgentSite, instance: str) -> dict:
    answer = requests.get(f"{site.orthanc.url}/instances/{instance}/metadata?expand", auth=site.orthanc.admin_auth,
                          timeout=10)
    answer.raise_for_status()
    return answer.json()


def test_cstore_stores_each_file_once(site):
    agent = site.start_agent()
    files = {f"ct-{number}.dcm": make_instance() for number in range(4)}
    files["mr.dcm"] = make_instance("MR_small.dcm")
    # JPEG 2000 pixel data is sent as it is, in its own presentation context.
    files["j2k.dcm"] = make_instance("JPEG2000.dcm")
    for name, data in files.items():
        (site.watch / name).write_bytes(data)

    stored = site.wait_stored([sop_instance_uid(data) for data in files.values()])
    agent.wait_for_log("Stored file", len(files))

    assert site.statistics()["CountInstances"] == len(files)
    for instance in stored.values():
        metadata = _metadata(site, instance)
        assert metadata["Origin"] == "DicomProtocol"
        assert metadata["RemoteAET"] == AE_TITLE
        assert metadata["RemoteIP"] == "127.0.0.1"
        assert site.source_machine(instance) == MACHINE_ID
    j2k = stored[sop_instance_uid(files["j2k.dcm"])]
    assert _metadata(site, j2k)["TransferSyntax"] == pydicom.uid.JPEG2000
    rows = site.spool_rows()
    assert {row["state"] for row in rows} == {"sent"}
    assert {row["instance_id"] for row in rows} == set(stored.values())


def test_cstore_result_checked_with_dcmtk(site, tmp_path):
    agent = site.start_agent()
    data = make_instance()
    uid = sop_instance_uid(data)
    (site.watch / "slice.dcm").write_bytes(data)
    instance = site.wait_stored([uid])[uid]
    agent.wait_for_log("Stored file")

    download = tmp_path / "stored.dcm"
    answer = requests.get(f"{site.orthanc.url}/instances/{instance}/file", auth=site.orthanc.admin_auth, timeout=10)
    answer.raise_for_status()
    download.write_bytes(answer.content)
    dump = subprocess.run(["dcmdump", "+P", "0008,0018", "+P", "0002,0010", str(download)],
                          capture_output=True, text=True, check=True).stdout
    assert f"[{uid}]" in dump
    # The file's own transfer syntax, Explicit VR Little Endian: nothing was transcoded.
    assert "=LittleEndianExplicit" in dump

    # The same file again from DCMTK with the machine's AE title: Orthanc keeps one instance.
    server = site.orthanc.server
    resend = subprocess.run(["storescu", "-v", "-aet", AE_TITLE, "-aec", server.aet, "127.0.0.1",
                             str(server.dicom_port), str(site.watch / "slice.dcm")],
                            capture_output=True, text=True, timeout=30)
    output = resend.stdout + resend.stderr
    assert "Received Store Response (Success)" in output
    assert site.statistics()["CountInstances"] == 1


def test_cstore_reuses_association(site):
    agent = site.start_agent()
    files = [make_instance() for _ in range(10)]
    for number, data in enumerate(files):
        (site.watch / f"slice-{number:02d}.dcm").write_bytes(data)

    site.wait_stored([sop_instance_uid(data) for data in files])
    log = agent.wait_for_log("Stored file", len(files))

    # One association per worker (the site runs 2 workers), never one per file.
    assert 1 <= log.count("Opened an association") <= 2


def test_cstore_tags_instance_of_latin1_patient(site):
    agent = site.start_agent()
    # The agent cannot compute this instance's Orthanc ID from the bytes, so it looks the instance up.
    data = make_instance(PatientID="Müller", SpecificCharacterSet="ISO_IR 100")
    uid = sop_instance_uid(data)
    (site.watch / "latin1.dcm").write_bytes(data)

    instance = site.wait_stored([uid])[uid]
    agent.wait_for_log("Stored file")

    assert site.source_machine(instance) == MACHINE_ID
    assert [row["instance_id"] for row in site.spool_rows()] == [instance]


def test_cstore_unknown_ae_stops_machine(site):
    config = site.write_config()
    config.write_text(config.read_text().replace(f'ae_title = "{AE_TITLE}"', 'ae_title = "NOT_REGISTERED"'))
    agent = site.start_agent()
    for number in range(3):
        (site.watch / f"slice-{number}.dcm").write_bytes(make_instance())

    log = agent.wait_for_log("Orthanc rejected the calling AE title of machine ct1")
    wait_until(lambda: site.status()["machines"][MACHINE_ID]["state"] == "credentials_rejected", 10,
               message="the status file to show the rejection")
    log = agent.log_text()

    assert log.count("Register the machine's AE title") == 1
    assert site.statistics()["CountInstances"] == 0
    assert {row["state"] for row in site.spool_rows()} == {"queued"}


def test_cstore_status_classification():
    assert cstore._classify(0x0000, "f").warning is None
    for warning in (0xB000, 0xB006, 0xB007):
        assert cstore._classify(warning, "f").status == warning
    with pytest.raises(cstore.TransientError):
        cstore._classify(0xA700, "f")
    with pytest.raises(cstore.TransientError):
        cstore._classify(0xA7FF, "f")
    with pytest.raises(cstore.FileRejected):
        cstore._classify(0xA900, "f")
    with pytest.raises(cstore.CannotUnderstand):
        cstore._classify(0xC000, "f")
    with pytest.raises(cstore.CannotUnderstand):
        cstore._classify(0xC123, "f")
    with pytest.raises(cstore.CallingAeRejected):
        cstore._classify(0x0124, "f")
    with pytest.raises(cstore.TransientError):
        cstore._classify(0x0110, "f")
