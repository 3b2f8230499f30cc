"""Tests of writing single study records, run in-process against a real Orthanc and SecantusDB.

They call the study updater and the change follower's page writer directly,
for the cases the service cannot be driven into from outside.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest

from dicomfleet.sync import updater
from dicomfleet.sync.config import load_config
from dicomfleet.sync.context import open_context
from dicomfleet.sync.feed import ChangeFollower
from dicomfleet.sync.orthanc import Change, ChangePage
from dicomfleet.sync.store import Checkpoint

from test_sync_support import (
    generate_uid,
    make_instance,
    servers,  # noqa: F401 (a fixture)
)


@pytest.fixture
def context_for(servers):
    """Return a factory of sync contexts on the module's servers, with optional record policy changes."""
    opened = []

    def create(**record_changes):
        config = load_config(servers.config_path)
        if record_changes:
            config = dataclasses.replace(config, records=dataclasses.replace(config.records, **record_changes))
        context = open_context(config, threading.Event(), max_attempts=2)
        context.studies.ensure_indexes()
        opened.append(context)
        return context

    yield create
    for context in opened:
        context.close()


def upload_study(servers, tags=None) -> tuple[str, str]:
    """Upload a one-instance study as ct1; return its StudyInstanceUID and Orthanc id."""
    study = generate_uid()
    instance = servers.upload(make_instance(study, tags=tags), "ct1", source_machine="ct1")
    return study, servers.orthanc_study_id(instance)


def test_refresh_placeholder_patient_id(servers, context_for):
    context = context_for(patient_id_policy="placeholder", patient_id_placeholder="NA")
    study, orthanc_id = upload_study(servers, tags={"PatientID": "REAL-ID-77"})

    outcome = updater.refresh_study(context, orthanc_id)
    record = servers.studies.find_one({"studyInstanceUID": study})

    assert outcome == "created"
    assert record["patientID"] == "NA"
    assert record["patientName"] == "CompressedSamples^CT1"


def test_refresh_dicom_patient_id(servers, context_for):
    context = context_for()
    study, orthanc_id = upload_study(servers, tags={"PatientID": "REAL-ID-78"})

    updater.refresh_study(context, orthanc_id)

    assert servers.studies.find_one({"studyInstanceUID": study})["patientID"] == "REAL-ID-78"


def test_refresh_twice_leaves_record_unchanged(servers, context_for):
    context = context_for()
    study, orthanc_id = upload_study(servers)

    first_outcome = updater.refresh_study(context, orthanc_id)
    first = servers.studies.find_one({"studyInstanceUID": study})
    second_outcome = updater.refresh_study(context, orthanc_id)
    second = servers.studies.find_one({"studyInstanceUID": study})

    assert first_outcome == "created"
    assert second_outcome == "unchanged"
    assert second == first
    assert len(servers.records_of(study)) == 1


def test_refresh_gone_study(servers, context_for):
    context = context_for()
    study, orthanc_id = upload_study(servers)
    deleted = servers.orthanc_delete(f"/studies/{orthanc_id}")

    outcome = updater.refresh_study(context, orthanc_id)

    assert deleted == 200
    assert outcome == updater.GONE
    assert servers.records_of(study) == []


def test_indexes_of_studies_collection(servers, context_for):
    context_for()

    indexes = servers.studies.index_information()

    assert indexes["one_record_per_study"]["key"] == [("orthancName", 1), ("studyInstanceUID", 1)]
    assert indexes["one_record_per_study"]["unique"] is True
    assert indexes["source_machine_last_received"]["key"] == [("sourceMachine", 1), ("lastReceivedAt", -1)]
    assert indexes["study_date"]["key"] == [("studyDate", 1)]


def test_deleted_change_marks_record(servers, context_for):
    # Orthanc 1.10.1 drops a deleted resource's changes instead of logging Deleted,
    # so this change is written here as another Orthanc version or plugin would log it.
    context = context_for()
    study, orthanc_id = upload_study(servers)
    updater.refresh_study(context, orthanc_id)
    change = Change(seq=10_000, change_type="Deleted", resource_type="Study", id=orthanc_id,
                    date="20261204T120000")

    ChangeFollower(context)._write_page(ChangePage(changes=[change], done=True, last=change.seq))
    record = servers.studies.find_one({"studyInstanceUID": study})

    assert record["deleted"] is True
    assert record["deletedAt"] >= record["createdAt"]
    assert servers.checkpoints.find_one({"_id": "local"})["seq"] == 10_000


def test_deleted_change_removes_record(servers, context_for):
    context = context_for(on_delete="remove")
    study, orthanc_id = upload_study(servers)
    updater.refresh_study(context, orthanc_id)
    change = Change(seq=10_001, change_type="Deleted", resource_type="Study", id=orthanc_id,
                    date="20261204T120000")

    ChangeFollower(context)._write_page(ChangePage(changes=[change], done=True, last=change.seq))

    assert servers.records_of(study) == []


def test_refresh_revives_deleted_record(servers, context_for):
    context = context_for()
    study, orthanc_id = upload_study(servers)
    updater.refresh_study(context, orthanc_id)
    created = servers.studies.find_one({"studyInstanceUID": study})
    updater.delete_study(context, {"studyInstanceUID": study}, f"study {study}")

    outcome = updater.refresh_study(context, orthanc_id)
    record = servers.studies.find_one({"studyInstanceUID": study})

    assert outcome == "updated"
    assert record["deleted"] is False
    assert "deletedAt" not in record
    assert record["createdAt"] == created["createdAt"]


def test_check_database_detects_other_change_at_checkpoint(servers, context_for):
    # Orthanc's feed reaches past the checkpoint, but its change there is not the recorded one:
    # the database was replaced and has since grown past the old checkpoint.
    context = context_for()
    upload_study(servers)
    first = context.orthanc.changes(0, 1).changes[0]
    context.checkpoints.save(Checkpoint(seq=first.seq, last_change={**first.fingerprint(), "id": "other-database"}))
    follower = ChangeFollower(context)
    follower.checkpoint = context.checkpoints.load()

    reset = follower._check_database()
    stored = servers.checkpoints.find_one({"_id": "local"})

    assert reset is True
    assert follower.checkpoint.seq == 0
    assert stored["seq"] == 0
    assert stored["seqBeforeReset"] == first.seq
    assert "but the checkpoint recorded" in stored["lastResetReason"]


def test_check_database_accepts_same_change(servers, context_for):
    context = context_for()
    upload_study(servers)
    first = context.orthanc.changes(0, 1).changes[0]
    context.checkpoints.save(Checkpoint(seq=first.seq, last_change=first.fingerprint()))
    follower = ChangeFollower(context)
    follower.checkpoint = context.checkpoints.load()

    reset = follower._check_database()

    assert reset is False
    assert follower.checkpoint.seq == first.seq


def test_replica_set_uri_writes_with_majority(servers):
    config = load_config(servers.config_path)
    uri = servers.mongo.uri + "?replicaSet=secantus"
    config = dataclasses.replace(config, mongodb=dataclasses.replace(config.mongodb, uri=uri))
    context = open_context(config, threading.Event(), max_attempts=2)
    study, orthanc_id = upload_study(servers)
    try:
        outcome = updater.refresh_study(context, orthanc_id)
        concern = context.studies.collection.write_concern.document
    finally:
        context.close()

    assert concern == {"w": "majority"}
    assert outcome == "created"
    assert len(servers.records_of(study)) == 1
