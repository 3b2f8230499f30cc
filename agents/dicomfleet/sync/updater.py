"""Bring one study's MongoDB record up to date with Orthanc, or apply its deletion.

Both the change follower and reconcile call these; each logs what it wrote with
the study's UID, its Orthanc id and its source machine.
"""

from __future__ import annotations

import concurrent.futures
import logging

from dicomfleet.sync.context import SyncContext
from dicomfleet.sync.orthanc import OrthancRequestError, ResourceNotFound
from dicomfleet.sync.provenance import BY_SOURCE_MACHINE
from dicomfleet.sync.record import build_record, read_study
from dicomfleet.sync.retry import Stopped
from dicomfleet.sync.store import RecordRejected

log = logging.getLogger(__name__)

GONE = "gone"
FAILED = "failed"
# Studies read from Orthanc and written to MongoDB at once. Each study costs
# several round trips, so a backlog or a repair is worked through in parallel.
REFRESH_WORKERS = 4


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
    end, or until the context's attempt limit.
    """
    try:
        snapshot = context.call_orthanc(f"reading Orthanc study {orthanc_id}",
                                        lambda: read_study(context.orthanc, orthanc_id))
    except ResourceNotFound:
        log.info("Orthanc study %s was deleted before the sync read it; no record written.", orthanc_id)
        return GONE
    except OrthancRequestError as error:
        log.error("Cannot read Orthanc study %s: %s. Its record is not updated; "
                  "the next reconcile tries again.", orthanc_id, error)
        return FAILED

    built = build_record(snapshot, context.config.orthanc, context.config.records, context.directory)
    uid = built.fields["studyInstanceUID"]
    if not uid:
        log.error("Orthanc study %s has no StudyInstanceUID; no record written.", orthanc_id)
        return FAILED
    _log_unknown_sources(uid, orthanc_id, built, context)

    try:
        outcome = context.call_mongodb(f"writing study {uid} (Orthanc study {orthanc_id})",
                                       lambda: context.studies.upsert(built.fields))
    except RecordRejected as error:
        log.error("%s. Orthanc study %s is skipped.", error, orthanc_id)
        return FAILED

    fields = built.fields
    if outcome == "unchanged":
        log.debug("Study %s (Orthanc study %s) is unchanged.", uid, orthanc_id)
    else:
        context.stats.count_record_written()
        log.info("Study %s (Orthanc study %s) %s: %d series, %d instances, source machine %s.",
                 uid, orthanc_id, outcome, fields["seriesCount"], fields["instanceCount"],
                 fields["sourceMachine"] or "unknown")
    return outcome


def refresh_studies(context: SyncContext, orthanc_ids: list[str]) -> list[str | None]:
    """Refresh the studies ORTHANC_IDS in parallel; return each one's outcome in order.

    An outcome is None for a study left unwritten because the service is stopping.
    """
    if len(orthanc_ids) <= 1:
        try:
            return [refresh_study(context, orthanc_id) for orthanc_id in orthanc_ids]
        except Stopped:
            return [None] * len(orthanc_ids)

    outcomes: list[str | None] = []
    with concurrent.futures.ThreadPoolExecutor(REFRESH_WORKERS, thread_name_prefix="refresh") as pool:
        futures = [pool.submit(refresh_study, context, orthanc_id) for orthanc_id in orthanc_ids]
        for future in futures:
            try:
                outcomes.append(future.result())
            except Stopped:
                outcomes.append(None)
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
