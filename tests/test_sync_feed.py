"""End-to-end tests of the sync service following a real Orthanc into a real SecantusDB.

One Orthanc, one SecantusDB and one ``dicomfleet sync`` subprocess serve every
test of this module, and each test uploads its own studies. The MongoDB URI
names a replica set, so the sync writes with majority write concern.
"""

from __future__ import annotations

import datetime
import subprocess

from dicomfleet.credentials import ADMIN_USER

from test_sync_support import (
    CHARSET_FILES,
    SYNC_USER,
    TEST_FILES,
    generate_uid,
    make_instance,
    running_sync,  # noqa: F401 (a fixture)
    wait_until,
)

SAME_PATIENT = {"PatientID": "FEED-PATIENT-1", "PatientName": "Feed^Patient"}


def test_feed_one_record_per_study_with_fields(running_sync):
    env = running_sync
    ct_study = generate_uid()
    ct_series = generate_uid()
    ct_instances = [env.upload(make_instance(ct_study, ct_series, tags=SAME_PATIENT), "ct1", source_machine="ct1")
                    for _ in range(3)]
    mr_study = generate_uid()
    env.upload(make_instance(mr_study, base=TEST_FILES / "MR_small.dcm"), "mr1", source_machine="mr1")

    ct_record = env.wait_for_record(ct_study)
    mr_record = env.wait_for_record(mr_study)

    assert len(env.records_of(ct_study)) == 1
    assert len(env.records_of(mr_study)) == 1
    assert ct_record["orthancStudyId"] == env.orthanc_study_id(ct_instances[0])
    assert ct_record["orthancName"] == "local"
    assert ct_record["remoteOrthancUrl"] == env.orthanc.url
    assert ct_record["patientID"] == "FEED-PATIENT-1"
    assert ct_record["patientName"] == "Feed^Patient"
    assert ct_record["studyDate"] == "20040119"
    assert ct_record["studyDescription"] == "e+1"
    assert ct_record["modality"] == "CT"
    assert ct_record["modalitiesInStudy"] == ["CT"]
    assert ct_record["seriesCount"] == 1
    assert ct_record["instanceCount"] == 3
    assert ct_record["series"] == [{"seriesInstanceUID": ct_series, "modality": "CT", "instanceCount": 3,
                                    "sourceMachine": "ct1"}]
    assert ct_record["sourceMachine"] == "ct1"
    assert ct_record["sourceMachines"] == ["ct1"]
    assert ct_record["sourceModality"] == "CT"
    assert ct_record["sourceAETitle"] == "CT1"
    assert ct_record["sourceIP"] == "127.0.0.1"
    assert ct_record["deleted"] is False
    assert isinstance(ct_record["createdAt"], datetime.datetime)
    assert ct_record["firstReceivedAt"] <= ct_record["lastReceivedAt"]
    assert mr_record["sourceMachine"] == "mr1"
    assert mr_record["modality"] == "MR"
    assert mr_record["patientID"] == "4MR1"


def test_feed_study_from_two_machines(running_sync):
    env = running_sync
    study = generate_uid()
    for _ in range(2):
        env.upload(make_instance(study, tags=SAME_PATIENT), "ct1", source_machine="ct1")
    env.upload(make_instance(study, base=TEST_FILES / "MR_small.dcm", tags=SAME_PATIENT), "mr1",
               source_machine="mr1")

    record = env.wait_for_record(study)

    assert record["sourceMachine"] == "ct1"
    assert sorted(record["sourceMachines"]) == ["ct1", "mr1"]
    assert record["modalitiesInStudy"] == ["CT", "MR"]
    assert record["seriesCount"] == 3
    assert record["instanceCount"] == 3


def test_feed_late_image_updates_same_record(running_sync):
    env = running_sync
    study = generate_uid()
    series = generate_uid()
    for _ in range(2):
        env.upload(make_instance(study, series, tags=SAME_PATIENT), "ct1", source_machine="ct1")
    first = env.wait_for_record(study)

    env.upload(make_instance(study, series, tags=SAME_PATIENT), "ct1", source_machine="ct1")
    env.upload(make_instance(study, base=TEST_FILES / "MR_small.dcm", tags=SAME_PATIENT), "mr1",
               source_machine="mr1")
    second = env.wait_for_record(study, condition=lambda record: record["instanceCount"] == 4)

    assert first["instanceCount"] == 2
    assert len(env.records_of(study)) == 1
    assert second["_id"] == first["_id"]
    assert second["createdAt"] == first["createdAt"]
    assert second["updatedAt"] > first["updatedAt"]
    assert second["seriesCount"] == 2
    assert second["modalitiesInStudy"] == ["CT", "MR"]
    assert sorted(second["sourceMachines"]) == ["ct1", "mr1"]


def test_feed_source_from_http_username(running_sync):
    env = running_sync
    study = generate_uid()
    env.upload(make_instance(study, base=TEST_FILES / "MR_small.dcm"), "mr1", source_machine=None)

    record = env.wait_for_record(study)

    assert record["sourceMachine"] == "mr1"
    assert record["sourceAETitle"] == "MR1"
    assert record["sourceModality"] == "MR"


def test_feed_source_from_cstore_ae_title(running_sync, tmp_path):
    env = running_sync
    study = generate_uid()
    path = tmp_path / "us.dcm"
    path.write_bytes(make_instance(study, tags={"Modality": "US"}))

    sent = subprocess.run(["storescu", "-aet", "US1", "-aec", "ORTHANC", "127.0.0.1",
                           str(env.orthanc.server.dicom_port), str(path)],
                          capture_output=True, text=True, timeout=60)
    record = env.wait_for_record(study)

    assert sent.returncode == 0
    assert record["sourceMachine"] == "us1"
    assert record["sourceAETitle"] == "US1"
    assert record["sourceIP"] == "127.0.0.1"
    assert record["sourceModality"] == "US"


def test_feed_unknown_source_stays_null_and_logged(running_sync):
    env = running_sync
    study = generate_uid()
    env.upload(make_instance(study), machine=None)

    record = env.wait_for_record(study)

    assert record["sourceMachine"] is None
    assert record["sourceMachines"] == []
    assert f"Study {study} (Orthanc study {record['orthancStudyId']}): 1 of 1 instances match no " \
           "configured machine" in env.log_text()
    assert f"HttpUsername '{ADMIN_USER}'" in env.log_text()


def test_feed_study_without_study_date_or_patient_name(running_sync):
    env = running_sync
    study = generate_uid()
    env.upload(make_instance(study, tags={"PatientName": "", "PatientID": "NO-NAME-1"},
                             remove=("StudyDate", "StudyDescription")), "ct1", source_machine="ct1")

    record = env.wait_for_record(study)

    assert record["studyDate"] is None
    assert record["patientName"] is None
    assert record["studyDescription"] is None
    assert record["patientID"] == "NO-NAME-1"
    assert record["instanceCount"] == 1


def test_feed_names_in_other_character_sets(running_sync):
    env = running_sync
    # The names as the files hold them, decoded from ISO_IR 144, ISO_IR 100 and ISO_IR 192 (UTF-8).
    # The last keeps its empty third component group, as Orthanc returns it.
    files = {"chrRuss.dcm": "Люкceмбypг", "chrGerm.dcm": "Äneas^Rüdiger", "chrX1.dcm": "Wang^XiaoDong=王^小東="}
    expected = {}
    for name, patient_name in files.items():
        study = generate_uid()
        expected[study] = patient_name
        env.upload(make_instance(study, base=CHARSET_FILES / name), "ct1", source_machine="ct1")

    names = {study: env.wait_for_record(study)["patientName"] for study in expected}

    assert names == expected


def test_feed_checkpoint_reaches_last_change(running_sync):
    env = running_sync
    study = generate_uid()
    env.upload(make_instance(study), "ct1", source_machine="ct1")
    env.wait_for_record(study)

    def caught_up():
        last = env.orthanc.get("/changes?last")["Last"]
        checkpoint = env.checkpoints.find_one({"_id": "local"})
        return checkpoint is not None and checkpoint["seq"] == last

    assert wait_until(caught_up, 10, "the checkpoint to reach Orthanc's last change")


def test_feed_log_has_no_secret(running_sync):
    env = running_sync
    text = env.log_text()

    assert "Sync 0.1.0 started" in text
    assert env.orthanc.secrets.orthanc_password(SYNC_USER) not in text
    assert env.orthanc.secrets.orthanc_password(ADMIN_USER) not in text
    assert " is unavailable while " not in text
