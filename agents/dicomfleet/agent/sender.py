"""The agent's upload workers: take due files from the spool, check them and send them to Orthanc.

Each worker thread keeps its own keep-alive HTTP connections and, for C-STORE machines,
one association per machine. A file is marked sent once Orthanc stored it. Orthanc
records who sent each instance (HttpUsername for REST, RemoteAET and RemoteIP for
C-STORE), and the sync names the machine from that. Archive and delete follow only
after Orthanc's stored copy is verified.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from dicomfleet.agent import aftersend, dicomfile, quarantine, rest
from dicomfleet.agent.backoff import backoff_delay
from dicomfleet.agent.breaker import AUTH_REJECTED, MachineBreaker
from dicomfleet.agent.config import AFTER_SEND_KEEP, TRANSPORT_CSTORE, AgentConfig, MachineConfig
from dicomfleet.agent.httpclient import HttpClient
from dicomfleet.agent.password import PasswordError, read_password
from dicomfleet.agent.repeats import RepeatedProblems
from dicomfleet.agent.spool import Spool, SpoolRecord

if TYPE_CHECKING:
    from dicomfleet.agent import cstore

log = logging.getLogger(__name__)

# Maximum time an idle worker waits before it looks at the spool again.
IDLE_WAIT_S = 1.0
SPOOL_RETRY_S = 5.0
# A rejected file that may still be written (it looks truncated) is quarantined only after it
# stayed unchanged this long, or quiet_time_s when that is longer, so a paused writer keeps its file.
GROWING_QUIET_S = 30.0
# Orthanc 1.10.1 returns C-STORE status 0xC000 "cannot understand" for a data set it cannot
# parse, but also for other errors while storing. So a file is quarantined only after this many.
CANNOT_UNDERSTAND_ATTEMPTS = 3


@dataclasses.dataclass
class MachineActivity:
    """The latest send results of one machine, for the status file and the metrics."""

    last_success_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    # Files stored in Orthanc (including AlreadyStored) and their bytes, since the agent started.
    files_sent: int = 0
    bytes_sent: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def count_sent(self, size: int) -> None:
        """Count one file of SIZE bytes stored in Orthanc and note the time of this success."""
        with self.lock:
            self.files_sent += 1
            self.bytes_sent += size
            self.last_success_at = time.time()


class Sender:
    """A pool of CONFIG.workers threads that send the spool's files to Orthanc."""

    def __init__(self, config: AgentConfig, spool: Spool, passwords: dict[str, str],
                 stop: threading.Event):
        self.config = config
        self.spool = spool
        self.passwords = dict(passwords)
        self.stop = stop
        self.machines = {machine.id: machine for machine in config.machines}
        self.breakers = {
            machine.id: MachineBreaker(machine.id, machine.orthanc_url, machine.username, machine.credential)
            for machine in config.machines
        }
        self.activity = {machine.id: MachineActivity() for machine in config.machines}
        self._claim_lock = threading.Lock()
        self._wakeup = threading.Condition()
        self._local = threading.local()
        self._threads: list[threading.Thread] = []
        self.problems = RepeatedProblems(log)

    def start(self) -> None:
        """Start the worker threads, and one that finishes the after-send policy of files sent before a stop."""
        # Read before the workers start, so the list holds only files that no worker is handling.
        policy_machines = [machine.id for machine in self.config.machines if machine.after_send != AFTER_SEND_KEEP]
        unverified = self.spool.sent_unverified(policy_machines)

        for number in range(1, self.config.workers + 1):
            thread = threading.Thread(target=self._run, name=f"sender-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("Started %d upload workers.", len(self._threads))

        if unverified:
            thread = threading.Thread(target=self._finish_unverified, args=(unverified,), name="after-send",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def notify(self) -> None:
        """Wake idle workers because files were queued."""
        with self._wakeup:
            self._wakeup.notify_all()

    def join(self) -> None:
        """Wait for every worker to finish its file in flight after STOP was set."""
        self.notify()
        for thread in self._threads:
            thread.join()
        log.info("Upload workers stopped.")

    def _client(self) -> HttpClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = HttpClient()
        return client

    def _claim(self) -> SpoolRecord | None:
        with self._claim_lock:
            allowed = [machine_id for machine_id, breaker in self.breakers.items() if breaker.may_send()]
            record = self.spool.claim(allowed)
            if record is not None:
                self.breakers[record.machine].begin_send()
            return record

    def _idle_wait(self) -> None:
        allowed = [machine_id for machine_id, breaker in self.breakers.items() if breaker.may_send()]
        next_due = self.spool.next_due(allowed)
        timeout = IDLE_WAIT_S
        if next_due is not None:
            timeout = min(IDLE_WAIT_S, max(0.05, next_due - time.time()))
        with self._wakeup:
            self._wakeup.wait(timeout)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    record = self._claim()
                    if record is None:
                        self._idle_wait()
                        continue
                except Exception as error:
                    # For example a full disk under the spool: wait and try again.
                    self.problems.report("claim", f"Cannot read the spool {self.spool.path}: {error}; "
                                                  f"retrying every {SPOOL_RETRY_S:.0f} s.", logging.ERROR)
                    self.stop.wait(SPOOL_RETRY_S)
                    continue
                self.problems.clear("claim", f"The spool {self.spool.path} is readable again.")
                self._process_safely(record)
        finally:
            client = getattr(self._local, "client", None)
            if client is not None:
                client.close()
            for link in getattr(self._local, "links", {}).values():
                link.close()

    def _link(self, machine: MachineConfig) -> cstore.CStoreLink:
        """Return this worker's C-STORE association holder for MACHINE."""
        links = getattr(self._local, "links", None)
        if links is None:
            links = self._local.links = {}
        link = links.get(machine.id)
        if link is None:
            cstore = _cstore_module()
            link = cstore.CStoreLink(machine.ae_title, machine.orthanc_aet, machine.dicom_host,
                                     machine.orthanc_dicom_port)
            links[machine.id] = link
        return link

    def _process_safely(self, record: SpoolRecord) -> None:
        machine = self.machines[record.machine]
        breaker = self.breakers[record.machine]
        try:
            self._process(record, machine, breaker)
        except Exception as error:
            # A bug or a spool error must cost one retry of one file, never a worker thread.
            log.exception("Unexpected error while sending file %s of machine %s (spool record %d).",
                          record.path, machine.id, record.id)
            breaker.end_without_response()
            try:
                self._retry_file(record, machine, f"unexpected error: {error}")
            except Exception:
                log.exception("Cannot record the failure of spool record %d; it is retried after a restart.",
                              record.id)

    def _note_error(self, machine: MachineConfig, message: str) -> None:
        activity = self.activity[machine.id]
        activity.last_error = message
        activity.last_error_at = time.time()

    def _retry_file(self, record: SpoolRecord, machine: MachineConfig, error: str) -> None:
        """Mark the record failed and schedule it with the file's own backoff."""
        delay = backoff_delay(record.attempts)
        self.spool.mark_failed(record.id, error, time.time() + delay)
        self._note_error(machine, error)

    def _unchanged_for(self, record: SpoolRecord, machine: MachineConfig) -> float:
        """Return the seconds the file has kept the size and mtime of its record.

        NOTE: a writer that keeps a file open and pauses longer than the quiet time makes
        the file look finished; the agent cannot see open file handles of other users.
        """
        now = time.time()
        unchanged_for = now - record.created_at
        if not machine.polling:
            # A local file's mtime comes from this host's clock; a share's may not.
            unchanged_for = max(unchanged_for, now - record.mtime_ns / 1e9)
        return unchanged_for

    def _wait_for_writer(self, record: SpoolRecord, machine: MachineConfig, reason: str, quiet: float) -> None:
        """Requeue a file that may still be written, to be checked again once unchanged for QUIET seconds."""
        delay = max(0.2, quiet - self._unchanged_for(record, machine))
        self.spool.requeue(record.id, time.time() + delay, error=f"waiting: {reason}")
        log.debug("File %s of machine %s may still be written (%s); checking again in %.1f s.",
                  record.path, machine.id, reason, delay)

    def _process(self, record: SpoolRecord, machine: MachineConfig, breaker: MachineBreaker) -> None:
        path = record.path

        try:
            stat = os.stat(path)
        except FileNotFoundError:
            breaker.end_without_response()
            self.spool.forget(record.id)
            log.warning("File %s of machine %s was deleted before it was sent; forgetting it.", path, machine.id)
            return
        except OSError as error:
            breaker.end_without_response()
            self._report_unreadable(record, machine, error)
            return

        if (stat.st_size, stat.st_mtime_ns) != (record.size, record.mtime_ns):
            breaker.end_without_response()
            new_id = self.spool.replace_identity(record.id, stat.st_size, stat.st_mtime_ns,
                                                 not_before=time.time() + self.config.quiet_time_s)
            log.debug("File %s of machine %s changed since it was queued (size %d -> %d); requeued as record %s.",
                      path, machine.id, record.size, stat.st_size, new_id)
            return

        try:
            verdict = dicomfile.check(path)
        except FileNotFoundError:
            breaker.end_without_response()
            self.spool.forget(record.id)
            log.warning("File %s of machine %s was deleted before it was sent; forgetting it.", path, machine.id)
            return
        except OSError as error:
            breaker.end_without_response()
            self._report_unreadable(record, machine, error)
            return

        quiet = self.config.quiet_time_s
        if not verdict.valid and verdict.may_grow:
            quiet = max(quiet, GROWING_QUIET_S)
        if (not verdict.valid or verdict.may_grow) and self._unchanged_for(record, machine) < quiet:
            breaker.end_without_response()
            self._wait_for_writer(record, machine, verdict.reason, quiet)
            return
        if not verdict.valid:
            breaker.end_without_response()
            self._quarantine(record, machine, f"not a valid DICOM file: {verdict.reason}")
            return

        if machine.transport != TRANSPORT_CSTORE:
            # A REST upload hashes the bytes on the wire, so the file is read once more only for C-STORE.
            self._send(record, machine, breaker, verdict)
            return

        cstore = _cstore_module()
        try:
            syntax = cstore.read_syntax(path)
            # The MD5 serves only the check before archive or delete.
            md5_from = syntax.dataset_offset if machine.after_send != AFTER_SEND_KEEP else None
            digests = aftersend.file_digests(path, md5_from)
        except cstore.FileRejected as error:
            breaker.end_without_response()
            self._quarantine(record, machine, f"cannot be sent with C-STORE: {error}")
            return
        except OSError as error:
            breaker.end_without_response()
            self._report_unreadable(record, machine, error)
            return
        self._send_cstore(record, machine, breaker, verdict, syntax, digests)

    def _report_unreadable(self, record: SpoolRecord, machine: MachineConfig, error: OSError) -> None:
        message = f"cannot read the file: {error.strerror or error}"
        if record.attempts <= 1:
            log.warning("Cannot read file %s of machine %s: %s; it stays queued and is retried with backoff.",
                        record.path, machine.id, error)
        else:
            log.debug("File %s of machine %s is still unreadable (attempt %d): %s.",
                      record.path, machine.id, record.attempts, error)
        self._retry_file(record, machine, message)

    def _target(self, machine: MachineConfig, reload: bool = False) -> rest.OrthancTarget:
        if reload:
            try:
                self.passwords[machine.id] = read_password(machine)
            except PasswordError as error:
                log.error("%s", error)
        return rest.OrthancTarget(url=machine.orthanc_url, auth=(machine.username, self.passwords[machine.id]),
                                  verify=machine.ca_file or True)

    def _send(self, record: SpoolRecord, machine: MachineConfig, breaker: MachineBreaker,
              verdict: dicomfile.Verdict) -> None:
        client = self._client()
        # After a rejection, read the password again in case it was fixed meanwhile.
        target = self._target(machine, reload=breaker.state == AUTH_REJECTED)
        log.debug("Sending file %s of machine %s (spool record %d, attempt %d).",
                  record.path, machine.id, record.id, record.attempts)

        try:
            # The MD5 serves only the check before archive or delete.
            result = rest.store_instance(client, target, record.path, record.size,
                                         with_md5=machine.after_send != AFTER_SEND_KEEP)
            self._check_unchanged(record, machine, result, client, target)
        except rest.AuthError as error:
            breaker.auth_rejected(error.status)
            self.spool.requeue(record.id, time.time(), error=breaker.last_error)
            self._note_error(machine, breaker.last_error)
            return
        except rest.TransientError as error:
            breaker.unreachable(str(error))
            self._retry_file(record, machine, str(error))
            return
        except rest.FileRejected as error:
            breaker.succeeded()
            self._quarantine(record, machine, str(error))
            return
        except rest.FileChangedError as error:
            breaker.end_without_response()
            log.warning("File %s of machine %s changed while it was sent (%s); it is queued again.",
                        record.path, machine.id, error)
            self._requeue_changed(record)
            return
        except _ChangedDuringSend:
            breaker.succeeded()
            self._requeue_changed(record)
            return
        except OSError as error:
            breaker.end_without_response()
            self._report_unreadable(record, machine, error)
            return

        self._stored(record, machine, breaker, verdict, result.instance_id, result.status, result.sha256,
                     result.md5, client, target)

    def _stored(self, record: SpoolRecord, machine: MachineConfig, breaker: MachineBreaker,
                verdict: dicomfile.Verdict, instance_id: str, status: str, sha256: str, md5: str,
                client: HttpClient, target: rest.OrthancTarget) -> None:
        """Record a stored file, apply its after-send policy, and resume the machine's backlog after an outage."""
        self.spool.mark_sent(record.id, instance_id, sha256=sha256)
        self.activity[machine.id].count_sent(record.size)
        log.info("Stored file %s of machine %s as Orthanc instance %s (%s); SOP Instance UID %s, study %s.",
                 record.path, machine.id, instance_id, status, verdict.sop_instance_uid,
                 verdict.study_instance_uid)
        if machine.after_send != AFTER_SEND_KEEP:
            self._verify_and_apply(record, machine, instance_id, md5, client, target)

        if breaker.succeeded():
            released = self.spool.release(machine.id)
            if released:
                log.info("Released %d queued files of machine %s for sending now.", released, machine.id)
                self.notify()

    def _send_cstore(self, record: SpoolRecord, machine: MachineConfig, breaker: MachineBreaker,
                     verdict: dicomfile.Verdict, syntax: cstore.FileSyntax, digests: aftersend.FileDigests) -> None:
        cstore = _cstore_module()
        client = self._client()
        target = self._target(machine, reload=breaker.state == AUTH_REJECTED)
        log.debug("Sending file %s of machine %s with C-STORE (spool record %d, attempt %d).",
                  record.path, machine.id, record.id, record.attempts)

        try:
            result = self._link(machine).store(record.path, syntax)
            if self._identity_changed(record):
                raise _ChangedDuringSend()
            instance_id = self._cstore_instance_id(client, target, verdict)
        except cstore.CallingAeRejected as error:
            breaker.calling_ae_rejected(str(error))
            self.spool.requeue(record.id, time.time(), error=breaker.last_error)
            self._note_error(machine, breaker.last_error)
            return
        except rest.AuthError as error:
            breaker.auth_rejected(error.status)
            self.spool.requeue(record.id, time.time(), error=breaker.last_error)
            self._note_error(machine, breaker.last_error)
            return
        except (cstore.TransientError, rest.TransientError) as error:
            breaker.unreachable(str(error))
            self._retry_file(record, machine, str(error))
            return
        except cstore.FileRejected as error:
            breaker.succeeded()
            self._quarantine(record, machine, str(error))
            return
        except cstore.CannotUnderstand as error:
            breaker.succeeded()
            if record.attempts >= CANNOT_UNDERSTAND_ATTEMPTS:
                self._quarantine(record, machine, f"{error}, {record.attempts} times")
            else:
                log.warning("File %s of machine %s: %s; retrying (attempt %d of %d before quarantine).",
                            record.path, machine.id, error, record.attempts, CANNOT_UNDERSTAND_ATTEMPTS)
                self._retry_file(record, machine, str(error))
            return
        except _ChangedDuringSend:
            breaker.succeeded()
            log.warning("File %s of machine %s changed while it was sent with C-STORE; it is queued again.",
                        record.path, machine.id)
            self._requeue_changed(record)
            return
        except OSError as error:
            breaker.end_without_response()
            self._report_unreadable(record, machine, error)
            return

        if result.warning:
            log.warning("Orthanc stored file %s of machine %s with warning status 0x%04X (%s).",
                        record.path, machine.id, result.status, result.warning)
        status = "C-STORE status 0x%04X" % result.status
        self._stored(record, machine, breaker, verdict, instance_id, status, digests.sha256, digests.md5,
                     client, target)

    def _cstore_instance_id(self, client: HttpClient, target: rest.OrthancTarget,
                            verdict: dicomfile.Verdict) -> str:
        """Return the Orthanc ID of the instance that a C-STORE stored.

        The ID is computed the way Orthanc computes it, which saves a request per file. A
        file without a readable Patient ID is looked up by its SOP Instance UID. When
        Orthanc decoded the Patient ID differently, the computed ID is wrong. The check
        before archive or delete then gets 404 and looks the instance up.
        """
        if verdict.patient_id is not None:
            return rest.instance_id_of(verdict.patient_id, verdict.study_instance_uid,
                                       verdict.series_instance_uid, verdict.sop_instance_uid)
        return self._find_cstore_instance(client, target, verdict.sop_instance_uid)

    @staticmethod
    def _find_cstore_instance(client: HttpClient, target: rest.OrthancTarget, sop_instance_uid: str) -> str:
        instance_id = rest.find_instance(client, target, sop_instance_uid)
        if instance_id is None:
            raise rest.TransientError(f"Orthanc acknowledged the C-STORE of SOP Instance UID "
                                      f"{sop_instance_uid} but does not list the instance")
        return instance_id

    def _verify_stored(self, record: SpoolRecord, machine: MachineConfig, instance_id: str, md5: str,
                       client: HttpClient, target: rest.OrthancTarget) -> str:
        """Verify Orthanc's copy of a sent file and return its instance ID, looked up again if need be.

        Raises aftersend.VerificationFailed, rest.TransientError or rest.AuthError.
        """
        try:
            aftersend.verify_stored(client, target, machine, instance_id, md5)
            return instance_id
        except rest.InstanceNotFound:
            if machine.transport != TRANSPORT_CSTORE:
                raise
        # The ID computed after a C-STORE was not Orthanc's: look the instance up by its SOP Instance UID.
        try:
            sop_instance_uid = dicomfile.check(record.path).sop_instance_uid
        except OSError as error:
            raise rest.TransientError(f"cannot read the SOP Instance UID of {record.path}: {error}") from error
        if not sop_instance_uid:
            raise aftersend.VerificationFailed(f"Orthanc has no instance {instance_id} and the file has no "
                                               f"SOP Instance UID to look it up by")
        found = self._find_cstore_instance(client, target, sop_instance_uid)
        log.debug("Orthanc has no instance %s, the ID computed for SOP Instance UID %s of machine %s; it is %s.",
                  instance_id, sop_instance_uid, machine.id, found)
        aftersend.verify_stored(client, target, machine, found, md5)
        return found

    def _identity_changed(self, record: SpoolRecord) -> bool:
        """Return True when the file's size or mtime differs from its record, after a send from disk."""
        try:
            stat = os.stat(record.path)
        except OSError:
            return False
        return (stat.st_size, stat.st_mtime_ns) != (record.size, record.mtime_ns)

    def _verify_and_apply(self, record: SpoolRecord, machine: MachineConfig, instance_id: str, md5: str,
                          client: HttpClient, target: rest.OrthancTarget) -> bool:
        """Verify Orthanc's copy of a sent file, then archive or delete the file; return True when done.

        On any failure the file stays in place and its record stays ``sent``; the next
        start of the agent tries again.
        """
        try:
            instance_id = self._verify_stored(record, machine, instance_id, md5, client, target)
        except aftersend.VerificationFailed as error:
            log.error("File %s of machine %s is kept, because Orthanc's copy differs: %s.",
                      record.path, machine.id, error)
            self._note_error(machine, f"kept {record.path}: {error}")
            return False
        except (rest.TransientError, rest.AuthError) as error:
            # NOTE: the check is tried again only at the agent's next start.
            log.warning("Cannot verify Orthanc instance %s of file %s of machine %s (%s); the file stays in place "
                        "until the agent's next start.", instance_id, record.path, machine.id, error)
            return False

        try:
            destination = aftersend.apply_policy(machine, record.path)
        except FileNotFoundError:
            log.warning("File %s of machine %s was gone before the after-send policy %r.",
                        record.path, machine.id, machine.after_send)
        except OSError as error:
            log.error("Cannot %s file %s of machine %s after Orthanc's copy was verified: %s. It stays in place "
                      "until the agent's next start.", machine.after_send, record.path, machine.id, error)
            self._note_error(machine, f"cannot {machine.after_send} {record.path}: {error}")
            return False
        else:
            if destination:
                log.info("Verified Orthanc instance %s and archived file %s of machine %s as %s.",
                         instance_id, record.path, machine.id, destination)
            else:
                log.info("Verified Orthanc instance %s and deleted file %s of machine %s.",
                         instance_id, record.path, machine.id)
        self.spool.mark_verified(record.id, instance_id=instance_id)
        return True

    def _finish_unverified(self, records: list[SpoolRecord]) -> None:
        """Verify and archive or delete RECORDS, files left ``sent`` by an earlier run."""
        log.info("Verifying %d sent files whose after-send policy was not applied yet.", len(records))

        with HttpClient() as client:
            for record in records:
                if self.stop.is_set():
                    return
                self._finish_one(record, client)

    def _finish_one(self, record: SpoolRecord, client: HttpClient) -> None:
        machine = self.machines[record.machine]
        if not os.path.lexists(record.path):
            # The policy ran, but the agent stopped before it recorded that.
            self.spool.mark_verified(record.id)
            return
        if self._identity_changed(record) or not record.instance_id:
            log.warning("File %s of machine %s changed since it was sent; it is kept and the watcher sends the "
                        "new version.", record.path, machine.id)
            return

        digests = self._sent_file_digests(record, machine)
        if digests is None:
            return
        if digests.sha256 != record.sha256:
            log.warning("File %s of machine %s differs from the version sent; it is kept.", record.path, machine.id)
            return
        self._verify_and_apply(record, machine, record.instance_id, digests.md5, client, self._target(machine))

    def _sent_file_digests(self, record: SpoolRecord, machine: MachineConfig) -> aftersend.FileDigests | None:
        """Return the digests of the file of RECORD as Orthanc stores it, or None when it cannot be read."""
        if machine.transport != TRANSPORT_CSTORE:
            try:
                return aftersend.file_digests(record.path, 0)
            except OSError as error:
                problem = error
        else:
            cstore = _cstore_module()
            try:
                offset = cstore.read_syntax(record.path).dataset_offset
                return aftersend.file_digests(record.path, offset)
            except (OSError, cstore.FileRejected) as error:
                problem = error
        log.warning("Cannot read sent file %s of machine %s to verify it: %s.", record.path, machine.id, problem)
        return None

    def _check_unchanged(self, record: SpoolRecord, machine: MachineConfig, result: rest.StoreResult,
                         client: HttpClient, target: rest.OrthancTarget) -> None:
        """Raise _ChangedDuringSend when the file's size or mtime changed while it was sent.

        Its size and mtime matched the spool record just before the send, so the
        bytes sent are the file's unless a writer touched it meanwhile.
        """
        try:
            stat = os.stat(record.path)
            after = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            # Deleted after a complete send: the bytes sent were the file's.
            return
        if after == (record.size, record.mtime_ns):
            return

        log.warning("File %s of machine %s changed while it was sent (size and mtime %s before, %s after).",
                    record.path, machine.id, (record.size, record.mtime_ns), after)
        if result.status == rest.STATUS_SUCCESS:
            # The instance was created from a mix of old and new bytes. Delete it, or the finished
            # file would get AlreadyStored and the mixed copy would stay.
            rest.delete_instance(client, target, result.instance_id)
            log.warning("Deleted Orthanc instance %s, stored from the changing file %s of machine %s.",
                        result.instance_id, record.path, machine.id)
        raise _ChangedDuringSend()

    def _requeue_changed(self, record: SpoolRecord) -> None:
        try:
            stat = os.stat(record.path)
        except OSError:
            self.spool.forget(record.id)
            return
        self.spool.replace_identity(record.id, stat.st_size, stat.st_mtime_ns,
                                    not_before=time.time() + self.config.quiet_time_s)

    def _quarantine(self, record: SpoolRecord, machine: MachineConfig, reason: str) -> None:
        watch_folder = machine.watch_folder_of(record.path)
        try:
            destination = quarantine.quarantine_file(self.config.quarantine, machine.id, watch_folder,
                                                     record.path, reason)
        except FileNotFoundError:
            self.spool.forget(record.id)
            log.warning("File %s of machine %s was deleted before it could be quarantined (%s); forgetting it.",
                        record.path, machine.id, reason)
            return
        except OSError as error:
            if record.attempts <= 1:
                log.error("Cannot move file %s of machine %s to the quarantine folder %s: %s. It stays in place "
                          "and is retried with backoff; reason for quarantine: %s.",
                          record.path, machine.id, self.config.quarantine, error, reason)
            else:
                log.debug("Moving file %s of machine %s to the quarantine folder failed again (attempt %d): %s.",
                          record.path, machine.id, record.attempts, error)
            self._retry_file(record, machine, f"cannot quarantine: {error}")
            return

        self.spool.mark_quarantined(record.id, reason)
        self._note_error(machine, f"quarantined {record.path}: {reason}")
        log.warning("Quarantined file %s of machine %s as %s: %s.", record.path, machine.id, destination, reason)


def _cstore_module():
    """Import the C-STORE module on first use and return it.

    It imports pydicom and pynetdicom, which cost about 0.3 s of CPU at start-up (measured
    with ``python -X importtime`` on 2 cores). An agent whose machines all use REST never needs them.
    """
    from dicomfleet.agent import cstore

    return cstore


class _ChangedDuringSend(Exception):
    """The file's content differed from its hash by the end of the send."""
