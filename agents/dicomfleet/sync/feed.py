"""Follow Orthanc's change feed from a checkpoint in MongoDB and write each stable study's record.

Pages are read while Orthanc reports more; then ``/changes`` is polled about
once a second, because Orthanc 1.10.1's feed does not block. The checkpoint
moves only after the records of a page are written.
"""

from __future__ import annotations

import logging
import time

from dicomfleet.sync import updater
from dicomfleet.sync.context import SyncContext
from dicomfleet.sync.orthanc import Change, ChangePage, ResourceNotFound
from dicomfleet.sync.reconcile import ReconcileReport, reconcile
from dicomfleet.sync.retry import Stopped, wait_or_stop
from dicomfleet.sync.store import TRANSIENT_ERRORS, Checkpoint

log = logging.getLogger(__name__)

PAGE_LIMIT = 500
POLL_INTERVAL_S = 1.0
# Limits of the check after a reconcile into an empty database, beyond which the
# feed is replayed from 0: pages of changes read, and studies read one by one.
MAX_COVER_CHECK_PAGES = 20
MAX_COVER_CHECK_STUDIES = 100

STABLE_STUDY = "StableStudy"
DELETED = "Deleted"
STUDY = "Study"


class ChangeFollower:
    """Reads one Orthanc server's change feed into MongoDB until the context's stop event is set."""

    def __init__(self, context: SyncContext):
        self.context = context
        # Unknown until read from MongoDB, so the metrics leave it out until then.
        self._checkpoint = Checkpoint(seq=0, last_change=None)
        self.seen_recoveries = 0
        self.last_reconcile = time.monotonic()
        self.backlog = 0

    @property
    def checkpoint(self) -> Checkpoint:
        """The change the records are written up to."""
        return self._checkpoint

    @checkpoint.setter
    def checkpoint(self, checkpoint: Checkpoint) -> None:
        self._checkpoint = checkpoint
        self.context.stats.checkpoint_seq = checkpoint.seq

    def run(self) -> None:
        """Prepare MongoDB, check Orthanc's database, reconcile, then follow the feed until stopped."""
        context = self.context
        try:
            context.call_mongodb("creating the indexes of the studies collection", context.studies.ensure_indexes)
            self.checkpoint = context.call_mongodb("reading the checkpoint", context.checkpoints.load)
            log.info("Following the change feed of %s from change %d.", context.orthanc.label, self.checkpoint.seq)

            if not self._check_database():
                self._reconcile()
            while True:
                self._follow_once()
        except Stopped:
            log.info("Stopping at change %d of %s.", self.checkpoint.seq, context.orthanc.label)

    def _follow_once(self) -> None:
        """Read and write one page of changes, or wait for new ones when the feed is read to its end."""
        context = self.context
        since = self.checkpoint.seq
        page = context.call_orthanc(f"reading the changes after {since}",
                                    lambda: context.orthanc.changes(since, PAGE_LIMIT))
        context.stats.orthanc_last_seq = page.last

        if context.orthanc_outage.recoveries != self.seen_recoveries:
            self.seen_recoveries = context.orthanc_outage.recoveries
            # A restarted Orthanc loses its list of studies that were not yet
            # stable, so those never get a StableStudy change. Reconcile finds them.
            # NOTE: a restart within one poll interval raises no error here, so
            # such studies wait for the next periodic reconcile.
            log.info("%s responds again; checking its database and reconciling.", context.orthanc.label)
            if not self._check_database():
                self._reconcile()
            return

        if not page.changes and page.last < since:
            self._reset(f"its change feed ends at change {page.last}, below the checkpoint {since}")
            return

        self._write_page(page)
        context.stats.last_cycle_at = time.time()
        if not page.done:
            self.backlog += len(page.changes)
            return

        if self.backlog:
            log.info("Caught up with the change feed of %s at change %d after %d changes.",
                     context.orthanc.label, self.checkpoint.seq, self.backlog + len(page.changes))
            self.backlog = 0
        interval = context.config.reconcile_interval_s
        if interval and time.monotonic() - self.last_reconcile >= interval:
            self._reconcile()
        wait_or_stop(context.stop, POLL_INTERVAL_S)

    def _write_page(self, page: ChangePage) -> None:
        """Write the records of PAGE's changes, then move the checkpoint past them."""
        # Orthanc can report one study stable several times in a page; only the last one is read.
        last_stable: dict[str, int] = {}
        for index, change in enumerate(page.changes):
            if change.change_type == STABLE_STUDY:
                last_stable[change.id] = index

        # Stable studies between two deletions are refreshed as one batch. A
        # deletion waits for the batch before it, so their order holds.
        done = [False] * len(page.changes)
        batch: list[int] = []
        stopped = False
        for index, change in enumerate(page.changes):
            if change.change_type == STABLE_STUDY and last_stable[change.id] == index:
                batch.append(index)
            elif change.change_type == DELETED and change.resource_type == STUDY:
                stopped = self._refresh(page, batch, done)
                if stopped:
                    break
                try:
                    updater.delete_study(self.context, {"orthancStudyId": change.id}, f"Orthanc study {change.id}")
                except Stopped:
                    stopped = True
                    break
                done[index] = True
            else:
                done[index] = True
        if not stopped:
            stopped = self._refresh(page, batch, done)

        # The checkpoint moves to the last change before the first one left unwritten.
        written_count = done.index(False) if False in done else len(done)
        written: Change | None = page.changes[written_count - 1] if written_count else None
        if stopped:
            self._save_on_stop(written)
            raise Stopped()

        if written is not None:
            checkpoint = Checkpoint(seq=written.seq, last_change=written.fingerprint())
            self.context.call_mongodb(f"saving the checkpoint at change {written.seq}",
                                      lambda: self.context.checkpoints.save(checkpoint))
            self.checkpoint = checkpoint

    def _refresh(self, page: ChangePage, batch: list[int], done: list[bool]) -> bool:
        """Refresh the studies of PAGE's changes at the indexes BATCH, mark them in DONE, empty BATCH.

        Returns True when the service is stopping and some were left unwritten.
        """
        outcomes = updater.refresh_studies(self.context, [page.changes[index].id for index in batch])
        for index, outcome in zip(batch, outcomes):
            done[index] = outcome is not None
        batch.clear()
        return None in outcomes

    def _save_on_stop(self, written: Change | None) -> None:
        """Save the checkpoint at the last written change with one attempt, because the service is stopping."""
        if written is None:
            return
        checkpoint = Checkpoint(seq=written.seq, last_change=written.fingerprint())
        try:
            self.context.checkpoints.save(checkpoint)
        except TRANSIENT_ERRORS as error:
            log.warning("Could not save the checkpoint at change %d while stopping (%s); "
                        "the next start reads the changes after %d again.", written.seq, error, self.checkpoint.seq)
            return
        self.checkpoint = checkpoint

    def _check_database(self) -> bool:
        """Reset the checkpoint if Orthanc's database is not the one it was taken from; return True if reset.

        The change at the checkpoint's sequence number must still be the one
        recorded. Orthanc 1.10.1 also drops a resource's changes when the
        resource is deleted, so a missing change proves nothing.
        """
        checkpoint = self.checkpoint
        if checkpoint.seq == 0:
            return False

        context = self.context
        page = context.call_orthanc(f"reading change {checkpoint.seq}",
                                    lambda: context.orthanc.changes(checkpoint.seq - 1, 1))
        if page.last < checkpoint.seq and not page.changes:
            self._reset(f"its change feed ends at change {page.last}, below the checkpoint {checkpoint.seq}")
            return True

        recorded = checkpoint.last_change
        if recorded is None or not page.changes or page.changes[0].seq != checkpoint.seq:
            return False
        current = page.changes[0].fingerprint()
        if current != recorded:
            self._reset(f"change {checkpoint.seq} is now {current['changeType']} of {current['id']}, "
                        f"but the checkpoint recorded {recorded.get('changeType')} of {recorded.get('id')}")
            return True
        return False

    def _reset(self, reason: str) -> None:
        """Start the feed again from 0 after Orthanc's database was replaced, and reconcile."""
        context = self.context
        previous = self.checkpoint.seq
        log.warning("%s has a new or restored database: %s. Resetting the checkpoint from change %d to 0 "
                    "and reconciling.", context.orthanc.label, reason, previous)
        self.checkpoint = context.call_mongodb("resetting the checkpoint",
                                               lambda: context.checkpoints.reset(previous, reason))
        self._reconcile()

    def _reconcile(self) -> None:
        context = self.context
        first = None
        if self.checkpoint.seq == 0:
            first = context.call_orthanc("reading the newest change", context.orthanc.last_change)

        report = reconcile(context, repair=True)
        self.last_reconcile = time.monotonic()

        if first is None or self.checkpoint.seq != 0:
            return
        if report.records or report.repair_failures:
            return
        if not self._reconcile_covers(first, report):
            return
        checkpoint = Checkpoint(seq=first.seq, last_change=first.fingerprint())
        context.call_mongodb(f"saving the checkpoint at change {first.seq}",
                             lambda: context.checkpoints.save(checkpoint))
        self.checkpoint = checkpoint
        log.info("Reconcile wrote all %d records of %s into an empty database; the change feed continues "
                 "after change %d instead of replaying it from 0.", report.repaired, context.orthanc.label, first.seq)

    def _reconcile_covers(self, first: Change, report: ReconcileReport) -> bool:
        """Return True when a reconcile into an empty database left nothing for the changes up to FIRST to write.

        Replaying the feed from 0 then reads every study again and writes
        nothing, so the checkpoint may move to FIRST, the newest change read
        before the reconcile listed Orthanc's studies. The caller has checked
        that MongoDB had no record of this Orthanc, so reconcile wrote each
        record whole, as the feed would, and that no write failed. The changes
        up to FIRST write records only through StableStudy: Deleted finds no
        record to mark. So every study in Orthanc now must have a record, or
        be not yet stable (its StableStudy comes after FIRST), or have a
        StableStudy after FIRST, which the feed reads. This check finds a study
        that the listing missed, because a deletion shifted the pages of
        ``/studies`` or because it shares its StudyInstanceUID with another
        study. FIRST must still be the same change, or Orthanc's database was replaced.
        """
        context = self.context
        written = {study.orthanc_id for study in report.missing_in_mongodb}
        leftovers = set(context.call_orthanc("listing the study ids", context.orthanc.study_ids)) - written

        since = first.seq - 1
        for _ in range(MAX_COVER_CHECK_PAGES):
            page = context.call_orthanc(f"reading the changes after {since}",
                                        lambda: context.orthanc.changes(since, PAGE_LIMIT))
            if since == first.seq - 1 and (not page.changes or page.changes[0] != first):
                log.info("Change %d of %s is not the one read before the reconcile; replaying the change feed "
                         "from 0.", first.seq, context.orthanc.label)
                return False
            for change in page.changes:
                if change.seq > first.seq and change.change_type == STABLE_STUDY:
                    leftovers.discard(change.id)
            if page.done or not page.changes:
                break
            since = page.changes[-1].seq
        else:
            log.info("More than %d changes of %s arrived during the reconcile; replaying the change feed from 0.",
                     MAX_COVER_CHECK_PAGES * PAGE_LIMIT, context.orthanc.label)
            return False

        if len(leftovers) > MAX_COVER_CHECK_STUDIES:
            log.info("%d studies of %s have no record and no StableStudy change after change %d; replaying the "
                     "change feed from 0.", len(leftovers), context.orthanc.label, first.seq)
            return False
        for orthanc_id in sorted(leftovers):
            try:
                study = context.call_orthanc(f"reading Orthanc study {orthanc_id}",
                                             lambda: context.orthanc.study(orthanc_id))
            except ResourceNotFound:
                continue
            if study.get("IsStable", True):
                log.info("Orthanc study %s is stable but reconcile did not list it; replaying the change feed "
                         "of %s from 0.", orthanc_id, context.orthanc.label)
                return False
        return True
