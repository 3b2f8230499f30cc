"""End-to-end tests of the sync service through faults: restarts, outages and a replaced Orthanc database.

Each test has its own Orthanc, SecantusDB and ``dicomfleet sync`` subprocess,
because each stops one of them.
"""

from __future__ import annotations

import re
import signal

from test_sync_support import (
    generate_uid,
    make_instance,
    sync_environment,  # noqa: F401 (a fixture)
    wait_until,
)


def upload_study(env, patient_id: str, instances: int = 1) -> str:
    study = generate_uid()
    series = generate_uid()
    for _ in range(instances):
        env.upload(make_instance(study, series, tags={"PatientID": patient_id}), "ct1", source_machine="ct1")
    return study


def wait_for_log(env, text: str, timeout: float = 30) -> None:
    wait_until(lambda: text in env.log_text(), timeout, f"the sync to log {text!r}")


def test_restart_mid_feed_no_duplicate_no_gap(sync_environment):
    env = sync_environment()
    env.start_sync()
    early = [upload_study(env, "RESTART-1"), upload_study(env, "RESTART-2")]
    early_records = {study: env.wait_for_record(study) for study in early}

    middle = [upload_study(env, f"RESTART-{number}") for number in (3, 4, 5)]
    env.wait_for_record(middle[0])
    killed = env.stop_sync(signal.SIGKILL)
    checkpoint = env.checkpoints.find_one({"_id": "local"})["seq"]
    late = upload_study(env, "RESTART-6")
    env.start_sync()
    for study in middle + [late]:
        env.wait_for_record(study)
    stopped = env.stop_sync()

    second_run = env.log_text().split("--- sync run 2")[1]
    assert killed == -signal.SIGKILL
    assert stopped == 0
    assert f"from change {checkpoint}." in second_run
    assert checkpoint > 0
    assert env.studies.count_documents({}) == 6
    for study in early + middle + [late]:
        assert len(env.records_of(study)) == 1
    for study, record in early_records.items():
        assert env.studies.find_one({"studyInstanceUID": study})["updatedAt"] == record["updatedAt"]


def test_mongodb_outage_records_arrive_afterwards(sync_environment):
    # A StableAge of 4 s leaves time to stop MongoDB after the sync has read
    # the study's first changes and before Orthanc reports the study stable.
    env = sync_environment(central={"dicomfleet_orthanc_stable_age": 4})
    env.start_sync()
    wait_for_log(env, "Reconcile found")
    study = upload_study(env, "MONGO-OUTAGE-1", instances=2)
    last = env.orthanc.get("/changes?last")["Last"]
    wait_until(lambda: (env.checkpoints.find_one({"_id": "local"}) or {}).get("seq") == last, 10,
               "the checkpoint to pass the study's new instances")

    env.mongo.stop()
    wait_for_log(env, f"is unavailable while writing study {study}")
    env.mongo.start()
    record = env.wait_for_record(study, timeout=60)
    wait_for_log(env, "is available again")
    text = env.log_text()

    assert record["instanceCount"] == 2
    assert len(env.records_of(study)) == 1
    assert len(re.findall(r"MongoDB at \S+ is unavailable while", text)) == 1
    assert env.stop_sync() == 0


def test_orthanc_outage_studies_arrive_afterwards(sync_environment):
    env = sync_environment()
    env.start_sync()
    before = upload_study(env, "ORTHANC-OUTAGE-1")
    env.wait_for_record(before)

    env.orthanc.stop()
    wait_for_log(env, "is unavailable while reading the changes")
    env.orthanc.start()
    after = upload_study(env, "ORTHANC-OUTAGE-2")
    record = env.wait_for_record(after, timeout=60)
    text = env.log_text()

    assert record["sourceMachine"] == "ct1"
    assert len(re.findall(r"Orthanc local at \S+ is unavailable while", text)) == 1
    assert "responds again; checking its database and reconciling" in text
    assert "has a new or restored database" not in text
    assert env.studies.find_one({"studyInstanceUID": before})["deleted"] is False


def test_orthanc_empty_database_resets_checkpoint(sync_environment):
    env = sync_environment()
    env.start_sync()
    old = upload_study(env, "WIPED-1", instances=3)
    env.wait_for_record(old)
    wait_until(lambda: env.checkpoints.find_one({"_id": "local"}), 10, "the first checkpoint")
    previous = env.checkpoints.find_one({"_id": "local"})["seq"]

    env.wipe_orthanc()
    wait_for_log(env, "has a new or restored database", timeout=60)
    new = upload_study(env, "WIPED-2")
    record = env.wait_for_record(new, timeout=60)
    checkpoint = env.checkpoints.find_one({"_id": "local"})
    old_record = env.studies.find_one({"studyInstanceUID": old})

    assert record["instanceCount"] == 1
    assert checkpoint["seqBeforeReset"] == previous
    assert "below the checkpoint" in checkpoint["lastResetReason"]
    assert checkpoint["seq"] <= env.orthanc.get("/changes?last")["Last"]
    assert old_record["deleted"] is True
    assert env.stop_sync() == 0


def test_deleted_study_marked_by_periodic_reconcile(sync_environment):
    env = sync_environment(reconcile_interval_s=1)
    env.start_sync()
    study = upload_study(env, "DELETED-1")
    record = env.wait_for_record(study)

    status = env.orthanc_delete(f"/studies/{record['orthancStudyId']}")
    deleted = env.wait_for_record(study, condition=lambda record: record.get("deleted") is True)
    upload_study_again = env.upload(make_instance(study, tags={"PatientID": "DELETED-1"}), "ct1",
                                    source_machine="ct1")
    revived = env.wait_for_record(study, condition=lambda record: record.get("deleted") is False)

    assert status == 200
    assert deleted["deletedAt"] >= record["updatedAt"]
    assert upload_study_again
    assert "deletedAt" not in revived
    assert revived["createdAt"] == record["createdAt"]
    assert len(env.records_of(study)) == 1


def test_deleted_study_removed_with_on_delete_remove(sync_environment):
    env = sync_environment(reconcile_interval_s=1, on_delete="remove")
    env.start_sync()
    study = upload_study(env, "REMOVED-1")
    record = env.wait_for_record(study)

    env.orthanc_delete(f"/studies/{record['orthancStudyId']}")
    wait_until(lambda: env.studies.count_documents({"studyInstanceUID": study}) == 0, 30,
               "the record to be removed")

    assert env.records_of(study) == []
    assert f"Record of study {study}" in env.log_text()
