"""Compare Orthanc's studies with MongoDB's records and, with --repair, fix every difference.

Run as ``dicomfleet sync reconcile --config PATH [--repair]`` (a dry run by
default); the sync service runs it with repair at start and periodically.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
from typing import Any

import pymongo.errors

from dicomfleet.sync import updater
from dicomfleet.sync.config import ConfigError, load_config
from dicomfleet.sync.context import SyncContext, open_context
from dicomfleet.sync.orthanc import OrthancRequestError, OrthancUnavailable, ResourceNotFound
from dicomfleet.sync.retry import Stopped
from dicomfleet.sync.store import TRANSIENT_ERRORS, redact_uri

log = logging.getLogger(__name__)

PAGE_SIZE = 500

# Attempts per call before the command line gives up on an unreachable server.
CLI_MAX_ATTEMPTS = 3

EXIT_AGREE = 0
EXIT_DIFFERENCES = 1
EXIT_ERROR = 2


@dataclasses.dataclass(frozen=True)
class StudyRef:
    """A study as both sides name it."""

    uid: str
    orthanc_id: str

    def __str__(self) -> str:
        return f"study {self.uid} (Orthanc study {self.orthanc_id})"


@dataclasses.dataclass(frozen=True)
class FieldMismatch:
    """A record whose Orthanc study id, series count or instance count differs from Orthanc's."""

    study: StudyRef
    field: str
    record_value: Any
    orthanc_value: Any

    def __str__(self) -> str:
        return f"{self.study}: {self.field} is {self.record_value} in MongoDB, {self.orthanc_value} in Orthanc"


@dataclasses.dataclass
class ReconcileReport:
    """The differences a reconcile found and, with repair, the fixes it made."""

    orthanc_studies: int = 0
    unstable_studies: int = 0
    records: int = 0
    missing_in_mongodb: list[StudyRef] = dataclasses.field(default_factory=list)
    missing_in_orthanc: list[StudyRef] = dataclasses.field(default_factory=list)
    mismatches: list[FieldMismatch] = dataclasses.field(default_factory=list)
    repaired: int = 0
    repair_failures: int = 0

    @property
    def differences(self) -> int:
        """The number of studies that differ between Orthanc and MongoDB."""
        return len(self.missing_in_mongodb) + len(self.missing_in_orthanc) + len(self.mismatches)

    def lines(self) -> list[str]:
        """Return one line per difference, for the command's output."""
        lines = [f"missing in MongoDB: {study}" for study in self.missing_in_mongodb]
        lines += [f"missing in Orthanc: {study}" for study in self.missing_in_orthanc]
        lines += [f"record differs: {mismatch}" for mismatch in self.mismatches]
        return lines


def _list_orthanc_studies(context: SyncContext, report: ReconcileReport) -> dict[str, dict[str, Any]]:
    """Return Orthanc's studies keyed by StudyInstanceUID, paging through ``/studies?expand``."""
    studies: dict[str, dict[str, Any]] = {}
    since = 0
    while True:
        page = context.call_orthanc(f"listing studies {since} to {since + PAGE_SIZE}",
                                    lambda: context.orthanc.studies_page(since, PAGE_SIZE))
        for study in page:
            uid = str(study.get("MainDicomTags", {}).get("StudyInstanceUID", ""))
            if uid in studies:
                # NOTE: two Orthanc studies with one UID (different patient IDs) share a
                # record key; only the first is compared.
                log.warning("Orthanc studies %s and %s both have the StudyInstanceUID %s; "
                            "only %s is compared.", studies[uid]["ID"], study["ID"], uid, studies[uid]["ID"])
                continue
            studies[uid] = study
        if len(page) < PAGE_SIZE:
            break
        since += PAGE_SIZE

    report.orthanc_studies = len(studies)
    return studies


def _compare(context: SyncContext, orthanc_studies: dict[str, dict[str, Any]],
             records: dict[str, dict[str, Any]], report: ReconcileReport) -> None:
    for uid, study in orthanc_studies.items():
        reference = StudyRef(uid, study["ID"])
        if not study.get("IsStable", True):
            # The change feed writes it once Orthanc reports it stable.
            report.unstable_studies += 1
            continue

        record = records.get(uid)
        if record is None or record.get("deleted"):
            report.missing_in_mongodb.append(reference)
            continue

        if record.get("orthancStudyId") != study["ID"]:
            report.mismatches.append(FieldMismatch(reference, "orthancStudyId",
                                                   record.get("orthancStudyId"), study["ID"]))
            continue

        series_count = len(study.get("Series", []))
        if record.get("seriesCount") != series_count:
            report.mismatches.append(FieldMismatch(reference, "seriesCount",
                                                         record.get("seriesCount"), series_count))
            continue

        # NOTE: an instance deleted from a study does not move its LastUpdate in
        # Orthanc 1.10.1, so such a difference goes unnoticed here.
        if record.get("orthancLastUpdate") == study.get("LastUpdate"):
            continue
        try:
            statistics = context.call_orthanc(f"counting the instances of {reference}",
                                              lambda: context.orthanc.study_statistics(study["ID"]))
        except ResourceNotFound:
            continue
        instance_count = int(statistics.get("CountInstances", 0))
        if record.get("instanceCount") != instance_count:
            report.mismatches.append(FieldMismatch(reference, "instanceCount",
                                                         record.get("instanceCount"), instance_count))

    for uid, record in records.items():
        if record.get("deleted") or uid in orthanc_studies:
            continue
        report.missing_in_orthanc.append(StudyRef(uid, str(record.get("orthancStudyId", ""))))


def _still_in_orthanc(context: SyncContext, study: StudyRef) -> bool:
    try:
        context.call_orthanc(f"checking that {study} is gone", lambda: context.orthanc.study(study.orthanc_id))
    except ResourceNotFound:
        return False
    return True


def _repair(context: SyncContext, report: ReconcileReport) -> None:
    to_refresh = report.missing_in_mongodb + [mismatch.study for mismatch in report.mismatches]
    outcomes = updater.refresh_studies(context, [study.orthanc_id for study in to_refresh])
    for outcome in outcomes:
        if outcome in (updater.FAILED, updater.GONE):
            report.repair_failures += 1
        elif outcome is not None:
            report.repaired += 1
    if None in outcomes:
        raise Stopped()

    for study in report.missing_in_orthanc:
        # Check once more, because a study stored while the list was paged can shift the pages.
        if study.orthanc_id and _still_in_orthanc(context, study):
            log.info("%s is in Orthanc after all; its record is kept.", study)
            report.repaired += 1
            continue
        updater.delete_study(context, {"studyInstanceUID": study.uid}, str(study))
        report.repaired += 1


def reconcile(context: SyncContext, repair: bool) -> ReconcileReport:
    """Compare every study of the context's Orthanc with its MongoDB records; fix them with REPAIR.

    Studies not yet stable are skipped. Records missing or marked deleted while
    Orthanc has the study, and records whose counts differ, are upserted again.
    Records of studies Orthanc no longer has are handled per ``[records] on_delete``.
    """
    report = ReconcileReport()
    log.info("Reconciling %s with MongoDB records%s.", context.orthanc.label, " (repair)" if repair else "")

    orthanc_studies = _list_orthanc_studies(context, report)
    records = {}
    for record in context.call_mongodb("reading the study records", lambda: list(context.studies.summaries())):
        records[str(record.get("studyInstanceUID"))] = record
    report.records = len(records)

    _compare(context, orthanc_studies, records, report)
    if repair:
        _repair(context, report)
    context.stats.note_reconcile(report)

    if report.differences:
        log.warning("Reconcile found differences: missing in MongoDB %d, missing in Orthanc %d, "
                    "records that differ %d; repaired %d, failed %d.",
                    len(report.missing_in_mongodb), len(report.missing_in_orthanc),
                    len(report.mismatches), report.repaired, report.repair_failures)
    else:
        log.info("Reconcile found no differences: studies in Orthanc %d (not yet stable %d), records %d.",
                 report.orthanc_studies, report.unstable_studies, report.records)
    return report


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet sync reconcile", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the sync's TOML configuration (sync.toml)")
    parser.add_argument("--repair", action="store_true",
                        help="upsert missing or outdated records and apply [records] on_delete to records "
                             "of studies Orthanc no longer has; without it nothing is changed")
    parser.add_argument("--log-level", default="WARNING",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level on stderr (default WARNING)")
    return parser


def main(args: list[str] | None = None) -> int:
    """Run one reconcile and print its differences.

    Exits 0 when both sides agree (after repair, if asked), 1 when differences
    remain, 2 when the configuration is invalid or a server cannot be reached.
    """
    options = _build_parser().parse_args(args)
    logging.basicConfig(level=options.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        config = load_config(options.config)
        context = open_context(config, threading.Event(), max_attempts=CLI_MAX_ATTEMPTS)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return EXIT_ERROR
    except pymongo.errors.ConfigurationError as error:
        print(f"{options.config}: [mongodb] uri is invalid: {error}", file=sys.stderr)
        return EXIT_ERROR

    try:
        report = reconcile(context, repair=options.repair)
    except OrthancUnavailable as error:
        print(f"Cannot reach {context.orthanc.label}: {error}", file=sys.stderr)
        return EXIT_ERROR
    except OrthancRequestError as error:
        print(f"{context.orthanc.label} rejected a request: {error}", file=sys.stderr)
        return EXIT_ERROR
    except TRANSIENT_ERRORS as error:
        print(f"Cannot use MongoDB at {redact_uri(config.mongodb.uri)}: {error}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        context.close()

    print(f"{context.orthanc.label}: {report.orthanc_studies} studies ({report.unstable_studies} not yet "
          f"stable, skipped). MongoDB database {config.mongodb.database}: {report.records} records of "
          f"Orthanc {config.orthanc.name}.")
    for line in report.lines():
        print(line)

    if not report.differences:
        print("Orthanc and MongoDB agree.")
        return EXIT_AGREE
    if not options.repair:
        print(f"{report.differences} differences; dry run, nothing changed. Run with --repair to fix them.")
        return EXIT_DIFFERENCES
    print(f"Repaired {report.repaired} of {report.differences} differences; {report.repair_failures} failed.")
    return EXIT_DIFFERENCES if report.repair_failures else EXIT_AGREE
