"""Tests of ``dicomfleet sync reconcile`` run as a subprocess against a real Orthanc and SecantusDB.

No sync service runs here, so MongoDB changes only when reconcile repairs it.
"""

from __future__ import annotations

import threading

from dicomfleet.sync import updater
from dicomfleet.sync.config import load_config
from dicomfleet.sync.context import open_context

from test_sync_support import (
    SyncEnvironment,
    generate_uid,
    make_instance,
    sync_environment,  # noqa: F401 (a fixture)
    wait_until,
)


def upload_stable_study(env, patient_id: str) -> tuple[str, str]:
    """Upload a one-instance study as ct1, wait until Orthanc reports it stable; return its UID and id."""
    study = generate_uid()
    instance = env.upload(make_instance(study, tags={"PatientID": patient_id}), "ct1", source_machine="ct1")
    orthanc_id = env.orthanc_study_id(instance)
    wait_until(lambda: env.orthanc.get(f"/studies/{orthanc_id}")["IsStable"], 15, f"study {study} to be stable")
    return study, orthanc_id


def write_record(env, orthanc_id: str) -> None:
    """Write a study's record in-process, as the sync service would."""
    context = open_context(load_config(env.config_path), threading.Event(), max_attempts=2)
    try:
        context.studies.ensure_indexes()
        updater.refresh_study(context, orthanc_id)
    finally:
        context.close()


def test_reconcile_missing_in_mongodb_then_repair(sync_environment):
    env = sync_environment()
    study, orthanc_id = upload_stable_study(env, "RECONCILE-1")

    dry_run = env.run_reconcile()
    records_after_dry_run = env.records_of(study)
    repair = env.run_reconcile("--repair")
    record = env.studies.find_one({"studyInstanceUID": study})
    again = env.run_reconcile()

    assert dry_run.returncode == 1
    assert f"missing in MongoDB: study {study} (Orthanc study {orthanc_id})" in dry_run.stdout
    assert "dry run, nothing changed" in dry_run.stdout
    assert records_after_dry_run == []
    assert repair.returncode == 0
    assert "Repaired 1 of 1 differences" in repair.stdout
    assert record["orthancStudyId"] == orthanc_id
    assert record["sourceMachine"] == "ct1"
    assert record["patientID"] == "RECONCILE-1"
    assert record["instanceCount"] == 1
    assert again.returncode == 0
    assert "Orthanc and MongoDB agree." in again.stdout


def test_reconcile_count_mismatch_and_missing_in_orthanc(sync_environment):
    env = sync_environment()
    counted, counted_id = upload_stable_study(env, "RECONCILE-2")
    deleted_study, deleted_id = upload_stable_study(env, "RECONCILE-3")
    write_record(env, counted_id)
    write_record(env, deleted_id)
    env.studies.update_one({"studyInstanceUID": counted},
                           {"$set": {"instanceCount": 99, "orthancLastUpdate": "20000101T000000"}})
    env.orthanc_delete(f"/studies/{deleted_id}")

    dry_run = env.run_reconcile()
    repair = env.run_reconcile("--repair")
    counted_record = env.studies.find_one({"studyInstanceUID": counted})
    deleted_record = env.studies.find_one({"studyInstanceUID": deleted_study})

    assert dry_run.returncode == 1
    assert f"record differs: study {counted} (Orthanc study {counted_id}): instanceCount is 99 in MongoDB, " \
           "1 in Orthanc" in dry_run.stdout
    assert f"missing in Orthanc: study {deleted_study} (Orthanc study {deleted_id})" in dry_run.stdout
    assert repair.returncode == 0
    assert counted_record["instanceCount"] == 1
    assert deleted_record["deleted"] is True


def test_reconcile_orthanc_unreachable(tmp_path):
    # The servers are never started, so the configured Orthanc port is closed.
    env = SyncEnvironment(tmp_path / "stopped")
    env.write_config()

    result = env.run_reconcile()

    assert result.returncode == 2
    assert f"Cannot reach Orthanc local at {env.orthanc.url}" in result.stderr


def test_reconcile_invalid_config(tmp_path):
    env = SyncEnvironment(tmp_path / "stopped")
    text = env.write_config().read_text()
    env.config_path.write_text(text.replace('database = "dicomfleet"', "database = 7"))

    result = env.run_reconcile()

    assert result.returncode == 2
    assert f"{env.config_path}: [mongodb] database: 7 must be a non-empty string." in result.stderr
