"""Bring study records in MongoDB up to date with Orthanc, a batch at a time, or apply a study's deletion.

Both the change follower and reconcile call these; each logs what it wrote with
the study's UID, its Orthanc id and its source machine.
"""

from __future__ import annotations

import logging

from dicomfleet.sync.context import SyncContext
from dicomfleet.sync.orthanc import OrthancRequestError, ResourceNotFound
from dicomfleet.sync.provenance import BY_SOURCE_MACHINE
from dicomfleet.sync.record import BuiltRecord, StudySnapshot, build_record, read_studies, read_study
from dicomfleet.sync.retry import Stopped
from dicomfleet.sync.store import RecordRejected

log = logging.getLogger(__name__)

GONE = "gone"
FAILED = "failed"
# Studies read from Orthanc with three /tools/bulk-content requests and
# written to MongoDB with one query and one bulk write.
REFRESH_BATCH = 100


def _log_unknown_sources(uid: str, orthanc_id: str, built, context: SyncContext) -> None:
    sources = built.sources
    for machine_id in sources.machine_ids:
        if context.directory.machine(machine_id) is None:
            log.warning("Study %s (Orthanc study %s): the %s %r is not a [[machine]] id of %s; "
                        "it is stored as written. Render the sync configuration again if the machine is new.",
                        uid, orthanc_id, BY_SOURCE_MACHINE, machine_id, context.config.path)

    if sources.unknown_instances == 0:
        return
    example = sources.unknown_example
    total = built.fields["instanceCount"]
    if sources.machine_id is None:
        consequence = "so its source machine stays null"
    else:
        consequence = f"so they are left out of its source machines (main source {sources.machine_id})"
    log.warning("Study %s (Orthanc study %s): %d of %d instances match no configured machine "
                "(for example HttpUsername %r, RemoteAET %r, RemoteIP %r), %s.",
                uid, orthanc_id, sources.unknown_instances, total, example.http_username,
                example.remote_aet, example.remote_ip, consequence)


def refresh_study(context: SyncContext, orthanc_id: str) -> str:
    """Read study ORTHANC_ID from Orthanc and upsert its record; return what happened.

    Returns "created", "updated", "unchanged", GONE when Orthanc no longer
    has the study, or FAILED when Orthanc or MongoDB rejected it for good (the
    error is logged and the caller moves on). Outages are retried until they
    end, or until the context's attempt limit. Raises Stopped when the service
    stops before the record is written.
    """
    outcome = refresh_studies(context, [orthanc_id])[0]
    if outcome is None:
        raise Stopped()
    return outcome


def refresh_studies(context: SyncContext, orthanc_ids: list[str]) -> list[str | None]:
    """Refresh the studies ORTHANC_IDS, REFRESH_BATCH at a time; return each one's outcome in order.

    An outcome is as refresh_study returns it, or None for a study left
    unwritten because the service is stopping.
    """
    outcomes: list[str | None] = []
    for start in range(0, len(orthanc_ids), REFRESH_BATCH):
        batch = orthanc_ids[start:start + REFRESH_BATCH]
        try:
            outcomes.extend(_refresh_batch(context, batch))
        except Stopped:
            break
    outcomes.extend([None] * (len(orthanc_ids) - len(outcomes)))
    return outcomes


def _read_batch(context: SyncContext, orthanc_ids: list[str]) -> dict[str, StudySnapshot | str]:
    """Return a snapshot, GONE or FAILED for each of the studies ORTHANC_IDS."""
    try:
        snapshots: dict[str, StudySnapshot | str] = context.call_orthanc(
            f"reading {len(orthanc_ids)} Orthanc studies from study {orthanc_ids[0]} on",
            lambda: read_studies(context.orthanc, orthanc_ids))
    except (OrthancRequestError, ResourceNotFound) as error:
        # An Orthanc without /tools/bulk-content returns 404 (1.10.1 has it).
        log.warning("Cannot read %d Orthanc studies at once (%s); reading them one by one.", len(orthanc_ids), error)
        return {orthanc_id: _read_one(context, orthanc_id) for orthanc_id in orthanc_ids}

    for orthanc_id in orthanc_ids:
        if orthanc_id not in snapshots:
            log.info("Orthanc study %s was deleted before the sync read it; no record written.", orthanc_id)
            snapshots[orthanc_id] = GONE
    return snapshots


def _read_one(context: SyncContext, orthanc_id: str) -> StudySnapshot | str:
    """Return the snapshot of study ORTHANC_ID, GONE or FAILED."""
    try:
        return context.call_orthanc(f"reading Orthanc study {orthanc_id}",
                                    lambda: read_study(context.orthanc, orthanc_id))
    except ResourceNotFound:
        log.info("Orthanc study %s was deleted before the sync read it; no record written.", orthanc_id)
        return GONE
    except OrthancRequestError as error:
        log.error("Cannot read Orthanc study %s: %s. Its record is not updated; "
                  "the next reconcile tries again.", orthanc_id, error)
        return FAILED


def _refresh_batch(context: SyncContext, orthanc_ids: list[str]) -> list[str]:
    """Read the studies ORTHANC_IDS, write their records with one bulk write; return each outcome."""
    snapshots = _read_batch(context, orthanc_ids)

    outcomes: list[str] = [FAILED] * len(orthanc_ids)
    pending: list[tuple[int, str, BuiltRecord]] = []
    for position, orthanc_id in enumerate(orthanc_ids):
        snapshot = snapshots[orthanc_id]
        if isinstance(snapshot, str):
            outcomes[position] = snapshot
            continue

        built = build_record(snapshot, context.config.orthanc, context.config.records, context.directory)
        uid = built.fields["studyInstanceUID"]
        if not uid:
            log.error("Orthanc study %s has no StudyInstanceUID; no record written.", orthanc_id)
            continue
        _log_unknown_sources(uid, orthanc_id, built, context)
        pending.append((position, orthanc_id, built))
    if not pending:
        return outcomes

    records = [built.fields for _, _, built in pending]
    _, first_id, first = pending[0]
    action = f"writing study {first.fields['studyInstanceUID']} (Orthanc study {first_id})"
    if len(records) > 1:
        action = f"writing {len(records)} study records, from study {first.fields['studyInstanceUID']} on"
    written = context.call_mongodb(action, lambda: context.studies.upsert_many(records))

    for (position, orthanc_id, built), outcome in zip(pending, written):
        fields = built.fields
        uid = fields["studyInstanceUID"]
        if isinstance(outcome, RecordRejected):
            log.error("%s. Orthanc study %s is skipped.", outcome, orthanc_id)
            continue
        outcomes[position] = outcome
        if outcome == "unchanged":
            log.debug("Study %s (Orthanc study %s) is unchanged.", uid, orthanc_id)
            continue
        context.stats.count_record_written()
        log.info("Study %s (Orthanc study %s) %s: %d series, %d instances, source machine %s.",
                 uid, orthanc_id, outcome, fields["seriesCount"], fields["instanceCount"],
                 fields["sourceMachine"] or "unknown")
    return outcomes


def delete_study(context: SyncContext, selector: dict[str, str], label: str) -> str:
    """Mark or remove the record matching SELECTOR, per ``[records] on_delete``; return the outcome.

    LABEL names the study in the log. Returns "marked", "removed" or "absent".
    """
    on_delete = context.config.records.on_delete
    outcome = context.call_mongodb(f"deleting the record of {label}",
                                   lambda: context.studies.apply_deletion(selector, on_delete))
    if outcome == "absent":
        log.debug("No live record of %s to delete.", label)
    else:
        context.stats.count_record_written()
        log.info("Record of %s %s: the study is no longer in %s.", label, outcome, context.orthanc.label)
    return outcome
