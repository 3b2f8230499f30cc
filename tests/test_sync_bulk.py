"""Tests of reading studies and writing their records in batches, in-process against a real Orthanc and SecantusDB."""

from __future__ import annotations

import threading

import pytest

from dicomfleet.sync import updater
from dicomfleet.sync.config import load_config
from dicomfleet.sync.context import open_context
from dicomfleet.sync.record import build_record, read_studies, read_study
from dicomfleet.sync.store import RecordRejected

from test_sync_support import (
    TEST_FILES,
    generate_uid,
    make_instance,
    servers,  # noqa: F401 (a fixture)
)


@pytest.fixture
def context(servers):
    """A sync context on the module's servers, with the indexes of the studies collection."""
    opened = open_context(load_config(servers.config_path), threading.Event(), max_attempts=2)
    opened.studies.ensure_indexes()
    yield opened
    opened.close()


def upload_two_series_study(servers) -> str:
    """Upload a study of two CT instances from ct1 and one MR instance from mr1; return its Orthanc id."""
    study = generate_uid()
    ct_series = generate_uid()
    patient = {"PatientID": "BULK-PATIENT-1"}
    instance = servers.upload(make_instance(study, ct_series, tags=patient), "ct1", source_machine="ct1")
    servers.upload(make_instance(study, ct_series, tags=patient), "ct1")
    servers.upload(make_instance(study, base=TEST_FILES / "MR_small.dcm", tags=patient), "mr1",
                   source_machine="mr1")
    return servers.orthanc_study_id(instance)


def upload_one_instance_study(servers, tags=None) -> str:
    """Upload a one-instance study as ct1; return its Orthanc id."""
    instance = servers.upload(make_instance(generate_uid(), tags=tags), "ct1", source_machine="ct1")
    return servers.orthanc_study_id(instance)


def by_id(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda entry: entry["ID"])


def test_read_studies_matches_read_study(servers, context):
    two_series = upload_two_series_study(servers)
    one_instance = upload_one_instance_study(servers)

    snapshots = read_studies(context.orthanc, [two_series, one_instance, "00000000-unknown-study"])

    assert sorted(snapshots) == sorted([two_series, one_instance])
    for orthanc_id in (two_series, one_instance):
        single = read_study(context.orthanc, orthanc_id)
        batch = snapshots[orthanc_id]
        assert batch.orthanc_id == orthanc_id
        assert batch.study == single.study
        assert by_id(batch.series) == by_id(single.series)
        assert batch.instance_metadata == single.instance_metadata
    assert len(snapshots[two_series].instance_metadata) == 3


def test_read_studies_builds_same_record(servers, context):
    orthanc_id = upload_two_series_study(servers)
    config = context.config

    batch = build_record(read_studies(context.orthanc, [orthanc_id])[orthanc_id], config.orthanc,
                         config.records, context.directory)
    single = build_record(read_study(context.orthanc, orthanc_id), config.orthanc, config.records,
                          context.directory)

    assert batch.fields == single.fields
    assert sorted(batch.fields["sourceMachines"]) == ["ct1", "mr1"]
    assert batch.fields["instanceCount"] == 3


def test_refresh_studies_outcomes_in_order(servers, context):
    first_id = upload_one_instance_study(servers)
    deleted_id = upload_one_instance_study(servers)
    last_id = upload_two_series_study(servers)
    delete_status = servers.orthanc_delete(f"/studies/{deleted_id}")
    orthanc_ids = [first_id, deleted_id, last_id]

    outcomes = updater.refresh_studies(context, orthanc_ids)
    again = updater.refresh_studies(context, orthanc_ids)

    assert delete_status == 200
    assert outcomes == ["created", updater.GONE, "created"]
    assert again == ["unchanged", updater.GONE, "unchanged"]
    assert servers.studies.count_documents({"orthancStudyId": {"$in": orthanc_ids}}) == 2


def test_refresh_studies_more_than_one_batch(servers, context, monkeypatch):
    monkeypatch.setattr(updater, "REFRESH_BATCH", 2)
    orthanc_ids = [upload_one_instance_study(servers) for _ in range(5)]

    outcomes = updater.refresh_studies(context, orthanc_ids)

    assert outcomes == ["created"] * 5
    assert servers.studies.count_documents({"orthancStudyId": {"$in": orthanc_ids}}) == 5


def test_refresh_studies_stopped_leaves_none(servers, context):
    orthanc_id = upload_one_instance_study(servers)
    context.stop.set()

    outcomes = updater.refresh_studies(context, [orthanc_id])

    assert outcomes == [None]
    assert servers.studies.count_documents({"orthancStudyId": orthanc_id}) == 0


def test_upsert_many_same_study_twice_in_batch(servers, context):
    uid = generate_uid()
    first = {"studyInstanceUID": uid, "orthancName": "local", "patientName": "First^Name"}
    second = {"studyInstanceUID": uid, "orthancName": "local", "patientName": "Second^Name"}

    outcomes = context.studies.upsert_many([first, second])
    records = servers.records_of(uid)

    assert outcomes == ["created", "updated"]
    assert len(records) == 1
    assert records[0]["patientName"] == "Second^Name"


def test_upsert_many_rejects_only_invalid_record(servers, context):
    good_uids = [generate_uid(), generate_uid()]
    invalid_uid = generate_uid()
    records = [
        {"studyInstanceUID": good_uids[0], "orthancName": "local"},
        # BSON cannot encode a Python set.
        {"studyInstanceUID": invalid_uid, "orthancName": "local", "modalitiesInStudy": {"CT"}},
        {"studyInstanceUID": good_uids[1], "orthancName": "local"},
    ]

    outcomes = context.studies.upsert_many(records)

    assert outcomes[0] == "created"
    assert isinstance(outcomes[1], RecordRejected)
    assert invalid_uid in str(outcomes[1])
    assert outcomes[2] == "created"
    assert len(servers.records_of(good_uids[0])) == 1
    assert len(servers.records_of(good_uids[1])) == 1
    assert servers.records_of(invalid_uid) == []


def test_upsert_many_insert_matches_upsert(servers, context):
    inserted_uid = generate_uid()
    upserted_uid = generate_uid()

    context.studies.upsert_many([{"studyInstanceUID": inserted_uid, "orthancName": "local", "seriesCount": 1}])
    context.studies.upsert({"studyInstanceUID": upserted_uid, "orthancName": "local", "seriesCount": 1})
    inserted = servers.records_of(inserted_uid)[0]
    upserted = servers.records_of(upserted_uid)[0]

    assert sorted(inserted) == sorted(upserted)
    assert inserted["deleted"] is False
    assert inserted["createdAt"] == inserted["updatedAt"]
