"""Tests of the agent's DICOM check over pydicom's real test files, generated cases and a real Orthanc.

The check must accept every file Orthanc 1.10.1 stores and reject, with a
reason, every file Orthanc rejects.
"""

from __future__ import annotations

import io
import random
import warnings
import zlib

import pydicom
import pytest
import requests

from agent_support import PYDICOM_FILES, AgentSite, make_instance
from dicomfleet.agent import dicomfile, rest

# pydicom test files that are not DICOM instances Orthanc stores, with a part of the reason the check gives.
REJECTED = {
    "MR_truncated.dcm": "truncated: element (7FE0,0010) at byte 1500 declares 8192 bytes",
    "rtplan_truncated.dcm": "truncated: element (300A,00B0)",
    "no_meta.dcm": "not a DICOM file",
    "SC_rgb_jpeg.dcm": "truncated: element (0008,0008)",
    "meta_missing_tsyntax.dcm": "names no Transfer Syntax UID",
    "JPEGLSNearLossless_08.dcm": "missing Study Instance UID (0020,000D)",
    "JPEGLSNearLossless_16.dcm": "missing Study Instance UID (0020,000D)",
    "SC_rgb_jls_lossy_line.dcm": "missing Study Instance UID (0020,000D)",
    "SC_rgb_jls_lossy_sample.dcm": "missing Study Instance UID (0020,000D)",
    "UN_sequence.dcm": "missing SOP Instance UID (0008,0018)",
    "empty_charset_LEI.dcm": "missing SOP Instance UID (0008,0018)",
    "nested_priv_SQ.dcm": "missing SOP Instance UID (0008,0018)",
    "no_meta_group_length.dcm": "missing SOP Instance UID (0008,0018)",
    "priv_SQ.dcm": "missing SOP Instance UID (0008,0018)",
    "README.txt": "not a DICOM file",
    "crayons.icc": "not a DICOM file",
    "rtplan.dump": "not a DICOM file",
    "rtstruct.dump": "not a DICOM file",
    "test1.json": "not a DICOM file",
    "test_PN.json": "not a DICOM file",
    "zipMR.gz": "not a DICOM file",
    "dicomdirtests/README.txt": "not a DICOM file",
    "dicomdirtests/TINY_ALPHA/README": "not a DICOM file",
}
for _name in ("DICOMDIR", "DICOMDIR-bigEnd", "DICOMDIR-empty.dcm", "DICOMDIR-implicit", "DICOMDIR-nooffset",
              "DICOMDIR-nopatient", "DICOMDIR-reordered", "TINY_ALPHA/DICOMDIR"):
    # A DICOMDIR indexes media; it is no instance and has no SOP Instance UID.
    REJECTED[f"dicomdirtests/{_name}"] = "missing SOP Instance UID (0008,0018)"

PYDICOM_TEST_FILES = sorted(str(path.relative_to(PYDICOM_FILES)) for path in PYDICOM_FILES.rglob("*") if path.is_file())


def _bare_implicit_dataset(template: str = "CT_small.dcm") -> bytes:
    """Return a pydicom test file re-encoded as a bare Implicit VR Little Endian data set."""
    dataset = pydicom.dcmread(PYDICOM_FILES / template)
    del dataset.file_meta
    dataset.preamble = None
    buffer = io.BytesIO()
    dataset.save_as(buffer, implicit_vr=True, little_endian=True)
    data = buffer.getvalue()
    assert data[128:132] != b"DICM"
    return data


def _with_sop_instance_uid(uid: str) -> bytes:
    """Return a generated instance whose SOP Instance UID is UID, valid or not."""
    dataset = pydicom.dcmread(io.BytesIO(make_instance()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset.SOPInstanceUID = uid
        buffer = io.BytesIO()
        dataset.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", PYDICOM_TEST_FILES)
def test_dicomfile_verdict_on_pydicom_test_file(name):
    verdict = dicomfile.check(PYDICOM_FILES / name)

    if name in REJECTED:
        assert verdict.valid is False
        assert REJECTED[name] in verdict.reason
    else:
        assert verdict.valid is True, verdict.reason
        assert verdict.sop_instance_uid


def test_dicomfile_rejects_zero_bytes(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")

    verdict = dicomfile.check(path)

    assert verdict.valid is False
    assert verdict.reason == "the file is empty (0 bytes)"
    assert verdict.may_grow is True


def test_dicomfile_rejects_random_bytes(tmp_path):
    path = tmp_path / "random.dcm"
    path.write_bytes(random.Random(1234).randbytes(20000))

    verdict = dicomfile.check(path)

    assert verdict.valid is False
    assert verdict.reason.startswith("not a DICOM file")
    assert verdict.may_grow is False


def test_dicomfile_rejects_short_file(tmp_path):
    path = tmp_path / "short.dcm"
    path.write_bytes(make_instance()[:100])

    verdict = dicomfile.check(path)

    assert verdict.valid is False
    assert "too short to be DICOM: 100 bytes" in verdict.reason
    assert verdict.may_grow is True


def test_dicomfile_cut_pixel_data_truncated(tmp_path):
    data = make_instance()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 1000])

    verdict = dicomfile.check(path)

    assert verdict.valid is False
    assert "truncated: element (7FE0,0010)" in verdict.reason
    assert verdict.may_grow is True


def test_dicomfile_header_only_may_grow(tmp_path):
    data = make_instance()
    pixel_data_header = data.index(b"\xe0\x7f\x10\x00")
    path = tmp_path / "header.dcm"
    path.write_bytes(data[:pixel_data_header])

    verdict = dicomfile.check(path)

    assert verdict.valid is True
    assert verdict.may_grow is True
    assert "no Pixel Data" in verdict.reason


def test_dicomfile_complete_image_is_final(tmp_path):
    data = make_instance()
    path = tmp_path / "complete.dcm"
    path.write_bytes(data)

    verdict = dicomfile.check(path)

    assert verdict.valid is True
    assert verdict.may_grow is False
    assert verdict.sop_instance_uid == str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID)
    assert verdict.transfer_syntax == "1.2.840.10008.1.2.1"


def test_dicomfile_accepts_bare_implicit_dataset(tmp_path):
    path = tmp_path / "bare.dcm"
    path.write_bytes(_bare_implicit_dataset())

    verdict = dicomfile.check(path)

    assert verdict.valid is True, verdict.reason
    assert verdict.transfer_syntax == ""


def test_dicomfile_truncated_deflate_stream(tmp_path):
    data = (PYDICOM_FILES / "image_dfl.dcm").read_bytes()
    path = tmp_path / "deflated.dcm"
    path.write_bytes(data[:-200])

    verdict = dicomfile.check(path)

    assert verdict.valid is False
    assert "truncated" in verdict.reason
    assert verdict.may_grow is True


def test_dicomfile_rejects_corrupt_deflate_stream(tmp_path):
    data = bytearray((PYDICOM_FILES / "image_dfl.dcm").read_bytes())
    meta_end = data.index(b"1.2.840.10008.1.2.1.99") + 24
    data[meta_end + 10: meta_end + 60] = b"\xff" * 50
    path = tmp_path / "corrupt.dcm"
    path.write_bytes(bytes(data))

    verdict = dicomfile.check(path)

    assert verdict.valid is False
    assert verdict.reason


def test_dicomfile_accepts_overlong_uid(tmp_path):
    path = tmp_path / "long-uid.dcm"
    path.write_bytes(_with_sop_instance_uid("1.2." + "3" * 90))

    verdict = dicomfile.check(path)

    assert verdict.valid is True, verdict.reason
    assert verdict.sop_instance_uid == "1.2." + "3" * 90


def test_dicomfile_raises_for_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        dicomfile.check(tmp_path / "absent.dcm")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    site = AgentSite(tmp_path_factory.mktemp("dicomfile-orthanc"))
    site.orthanc.start()
    yield site.orthanc
    site.orthanc.stop()


def _orthanc_accepts(orthanc, data: bytes) -> bool:
    answer = requests.post(orthanc.url + "/instances", data=data, auth=orthanc.admin_auth, timeout=30)
    assert answer.status_code in (200, 400, 404), answer.text
    return answer.status_code == 200


def test_dicomfile_agrees_with_orthanc(orthanc, tmp_path):
    cases = {name: (PYDICOM_FILES / name).read_bytes() for name in PYDICOM_TEST_FILES}
    full = make_instance()
    cases["generated: bare implicit VR data set"] = _bare_implicit_dataset()
    cases["generated: zero bytes"] = b""
    cases["generated: random bytes"] = random.Random(99).randbytes(5000)
    cases["generated: cut inside Pixel Data"] = full[:-3000]
    cases["generated: deflate cut short"] = (PYDICOM_FILES / "image_dfl.dcm").read_bytes()[:-300]
    cases["generated: zlib stream with a Part 10 header"] = full[:132] + zlib.compress(full[132:])
    cases["generated: unknown transfer syntax"] = make_instance().replace(b"1.2.840.10008.1.2.1\x00",
                                                                          b"1.2.840.10008.9.9.9\x00")
    cases["generated: SOP Instance UID over 64 characters"] = _with_sop_instance_uid("1.2." + "3" * 90)
    cases["generated: blank SOP Instance UID"] = _with_sop_instance_uid("  ")

    disagreements = []
    for name, data in cases.items():
        path = tmp_path / "case.dcm"
        path.write_bytes(data)
        verdict = dicomfile.check(path)
        accepted = _orthanc_accepts(orthanc, data)
        if verdict.valid != accepted:
            disagreements.append(f"{name}: check {verdict.valid} ({verdict.reason}), Orthanc {accepted}")

    assert disagreements == []
    assert len(cases) == len(PYDICOM_TEST_FILES) + 9


def test_dicomfile_patient_id_gives_orthanc_id(orthanc, tmp_path):
    cases = {name: (PYDICOM_FILES / name).read_bytes() for name in PYDICOM_TEST_FILES if name not in REJECTED}
    # Orthanc drops trailing padding of a Patient ID but keeps leading spaces.
    cases["generated: Patient ID with leading spaces"] = make_instance(PatientID="  AB  ")
    cases["generated: Patient ID padded with NUL"] = make_instance(PatientID="AB\0")
    cases["generated: no Patient ID"] = make_instance(PatientID="")

    wrong = []
    computed = 0
    for name, data in cases.items():
        path = tmp_path / "case.dcm"
        path.write_bytes(data)
        verdict = dicomfile.check(path)
        answer = requests.post(orthanc.url + "/instances", data=data, auth=orthanc.admin_auth, timeout=30)
        if answer.status_code != 200 or verdict.patient_id is None:
            continue
        computed += 1
        expected = rest.instance_id_of(verdict.patient_id, verdict.study_instance_uid,
                                       verdict.series_instance_uid, verdict.sop_instance_uid)
        if answer.json()["ID"] != expected:
            wrong.append(f"{name}: Orthanc {answer.json()['ID']}, computed {expected}")

    assert wrong == []
    assert computed >= 60


def test_dicomfile_patient_id_unknown_for_other_charset(tmp_path):
    path = tmp_path / "latin1.dcm"
    path.write_bytes(make_instance(PatientID="Müller", SpecificCharacterSet="ISO_IR 100"))

    verdict = dicomfile.check(path)

    assert verdict.valid is True
    assert verdict.patient_id is None


def test_dicomfile_patient_id_unknown_for_vr_un():
    # This file encodes Patient ID with VR UN, whose padding Orthanc keeps.
    verdict = dicomfile.check(PYDICOM_FILES / "rtdose_rle.dcm")

    assert verdict.valid is True
    assert verdict.patient_id is None
