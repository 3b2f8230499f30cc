"""Tests of where the change feed continues after the first reconcile, in-process against a real Orthanc and SecantusDB.

Each test starts its own Orthanc and SecantusDB, because the feed may skip
the changes before the reconcile only when MongoDB has no record yet.
"""

from __future__ import annotations

import threading

from dicomfleet.sync import updater
from dicomfleet.sync.config import load_config
from dicomfleet.sync.context import open_context
from dicomfleet.sync.feed import ChangeFollower

from test_sync_support import (
    generate_uid,
    make_instance,
    sync_environment,  # noqa: F401 (a fixture)
    wait_until,
)


def upload_stable_study(env, patient_id: str, study_uid: str | None = None) -> str:
    """Upload a one-instance study as ct1, wait until Orthanc reports it stable; return its Orthanc id."""
    instance = env.upload(make_instance(study_uid or generate_uid(), tags={"PatientID": patient_id}), "ct1",
                          source_machine="ct1")
    orthanc_id = env.orthanc_study_id(instance)
    wait_until(lambda: env.orthanc.get(f"/studies/{orthanc_id}")["IsStable"], 15, f"study {orthanc_id} to be stable")
    return orthanc_id


def start_follower(env):
    """Return a change follower on ENV's servers with its indexes and checkpoint read, as run() starts."""
    context = open_context(load_config(env.config_path), threading.Event(), max_attempts=2)
    context.studies.ensure_indexes()
    follower = ChangeFollower(context)
    follower.checkpoint = context.checkpoints.load()
    return follower


def test_first_reconcile_moves_checkpoint(sync_environment):
    env = sync_environment()
    orthanc_ids = [upload_stable_study(env, f"START-{number}") for number in range(3)]
    newest = env.orthanc.get("/changes?last")["Changes"][0]
    follower = start_follower(env)

    try:
        follower._reconcile()
    finally:
        follower.context.close()
    stored = env.checkpoints.find_one({"_id": "local"})

    assert follower.checkpoint.seq == newest["Seq"]
    assert stored["seq"] == newest["Seq"]
    assert stored["lastChange"]["id"] == newest["ID"]
    assert stored["lastChange"]["changeType"] == newest["ChangeType"]
    assert env.studies.count_documents({"orthancStudyId": {"$in": orthanc_ids}}) == 3


def test_reconcile_with_records_replays_feed(sync_environment):
    env = sync_environment()
    recorded = upload_stable_study(env, "START-RECORDED")
    upload_stable_study(env, "START-MISSING")
    follower = start_follower(env)

    try:
        updater.refresh_study(follower.context, recorded)
        follower._reconcile()
    finally:
        follower.context.close()

    assert follower.checkpoint.seq == 0
    assert env.checkpoints.find_one({"_id": "local"}) is None
    assert env.studies.count_documents({}) == 2


def test_study_left_out_of_listing_replays_feed(sync_environment):
    # Two Orthanc studies share one StudyInstanceUID, so reconcile compares only
    # the first, as it would miss a study when a deletion shifts the listing.
    env = sync_environment()
    shared_uid = generate_uid()
    upload_stable_study(env, "START-SHARED-1", shared_uid)
    upload_stable_study(env, "START-SHARED-2", shared_uid)
    follower = start_follower(env)

    try:
        follower._reconcile()
    finally:
        follower.context.close()

    assert follower.checkpoint.seq == 0
    assert env.checkpoints.find_one({"_id": "local"}) is None
    assert env.studies.count_documents({"studyInstanceUID": shared_uid}) == 1


def test_service_follows_feed_after_skipped_replay(sync_environment):
    env = sync_environment()
    before = upload_stable_study(env, "START-BEFORE")

    env.start_sync()
    wait_until(lambda: "instead of replaying it from 0" in env.log_text(), 30, "the first reconcile to move the checkpoint")
    after_uid = generate_uid()
    upload_stable_study(env, "START-AFTER", after_uid)
    record = env.wait_for_record(after_uid)
    last = env.orthanc.get("/changes?last")["Last"]
    wait_until(lambda: env.checkpoints.find_one({"_id": "local"})["seq"] >= last, 30, "the checkpoint to reach the end")
    status = env.stop_sync()

    assert env.studies.count_documents({"orthancStudyId": before}) == 1
    assert record["patientID"] == "START-AFTER"
    assert status == 0
