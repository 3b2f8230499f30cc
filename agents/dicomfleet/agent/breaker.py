"""A circuit breaker per machine in front of Orthanc: closed while sends succeed, open after errors.

While a machine's breaker is open only one probe file at a time is sent for it,
so a down Orthanc or a wrong password causes neither a retry storm nor a log flood.
"""

from __future__ import annotations

import logging
import threading
import time

from dicomfleet.agent.backoff import backoff_delay

log = logging.getLogger(__name__)

CLOSED = "closed"
UNREACHABLE = "unreachable"
AUTH_REJECTED = "auth_rejected"

# After Orthanc rejected the machine's credentials, retry this often, regardless of the backoff.
AUTH_RETRY_S = 60.0
# While the breaker stays open, repeat the warning this often with the count of failures.
REMINDER_S = 600.0
# An outage of this many consecutive failures releases the backlog when it ends.
RELEASE_AFTER_FAILURES = 2


class MachineBreaker:
    """The breaker of one machine; every method is thread-safe."""

    def __init__(self, machine_id: str, orthanc_url: str, username: str, credential: str,
                 clock=time.monotonic):
        self.machine_id = machine_id
        self.orthanc_url = orthanc_url
        self.username = username
        self.credential = credential
        self.clock = clock
        self._lock = threading.Lock()
        self.state = CLOSED
        self.retry_at = 0.0
        self.probing = False
        self.failures = 0
        self.opened_at = 0.0
        self.reminded_at = 0.0
        self.last_error = ""

    def may_send(self) -> bool:
        """Return True when a worker may claim one of this machine's files now."""
        with self._lock:
            if self.state == CLOSED:
                return True
            return not self.probing and self.clock() >= self.retry_at

    def begin_send(self) -> None:
        """Note that a worker claimed a file; while open, that file is the one probe."""
        with self._lock:
            if self.state != CLOSED:
                self.probing = True

    def end_without_response(self) -> None:
        """End a probe that never reached Orthanc, for example because the file was gone."""
        with self._lock:
            self.probing = False

    def succeeded(self) -> bool:
        """Close the breaker after Orthanc stored a file; return True when a real outage ended."""
        with self._lock:
            self.probing = False
            if self.state == CLOSED:
                self.failures = 0
                return False

            was = self.state
            failures = self.failures
            downtime = self.clock() - self.opened_at
            self.state = CLOSED
            self.failures = 0
            self.last_error = ""

        if was == AUTH_REJECTED:
            log.info("Orthanc at %s accepts the credentials of machine %s (user %s) again after %d "
                     "rejected attempts over %.0f s; sending resumes.",
                     self.orthanc_url, self.machine_id, self.username, failures, downtime)
        else:
            log.info("Orthanc at %s is reachable again for machine %s after %d failed attempts over %.0f s; "
                     "sending resumes.", self.orthanc_url, self.machine_id, failures, downtime)
        return failures >= RELEASE_AFTER_FAILURES

    def unreachable(self, error: str) -> float:
        """Open the breaker after a connection error, timeout or 5xx; return the seconds until the next probe."""
        with self._lock:
            self.probing = False
            now = self.clock()
            self.failures += 1
            self.last_error = error
            if self.state == AUTH_REJECTED:
                delay = AUTH_RETRY_S
            else:
                delay = backoff_delay(self.failures)
            self.retry_at = now + delay

            first = self.state == CLOSED
            if first:
                self.state = UNREACHABLE
                self.opened_at = now
                self.reminded_at = now
            remind = not first and now - self.reminded_at >= REMINDER_S
            if remind:
                self.reminded_at = now
            failures = self.failures
            since = now - self.opened_at

        if first:
            log.warning("Orthanc at %s is unreachable for machine %s: %s. Files stay queued; one probe file "
                        "is retried with backoff (1 s to 60 s) and further failures are counted, not logged.",
                        self.orthanc_url, self.machine_id, error)
        elif remind:
            log.warning("Orthanc at %s is still unreachable for machine %s: %d failed attempts over %.0f s, "
                        "last error: %s.", self.orthanc_url, self.machine_id, failures, since, error)
        else:
            log.debug("Orthanc at %s still unreachable for machine %s (failure %d): %s; next probe in %.1f s.",
                      self.orthanc_url, self.machine_id, failures, error, delay)
        return delay

    def auth_rejected(self, status: int) -> float:
        """Open the breaker after HTTP 401 or 403; return the seconds until the next try."""
        with self._lock:
            self.probing = False
            now = self.clock()
            self.failures += 1
            self.last_error = (f"Orthanc rejected the credentials of user {self.username} "
                               f"(HTTP {status}); check the credential {self.credential}")
            self.retry_at = now + AUTH_RETRY_S

            first = self.state != AUTH_REJECTED
            if first:
                self.state = AUTH_REJECTED
                self.opened_at = now
                self.reminded_at = now
            remind = not first and now - self.reminded_at >= REMINDER_S
            if remind:
                self.reminded_at = now
            failures = self.failures
            since = now - self.opened_at

        if first:
            log.error("Orthanc at %s rejected the credentials of machine %s (user %s, HTTP %d). Sending for %s "
                      "is stopped and its files stay queued. Fix the password in the credential %s (or its "
                      "password_file) and restart the agent; meanwhile it tries again every %.0f s.",
                      self.orthanc_url, self.machine_id, self.username, status, self.machine_id,
                      self.credential, AUTH_RETRY_S)
        elif remind:
            log.error("Orthanc at %s still rejects the credentials of machine %s (user %s): %d attempts over "
                      "%.0f s.", self.orthanc_url, self.machine_id, self.username, failures, since)
        else:
            log.debug("Orthanc at %s rejected the credentials of machine %s again (attempt %d).",
                      self.orthanc_url, self.machine_id, failures)
        return AUTH_RETRY_S

    def calling_ae_rejected(self, detail: str) -> float:
        """Open the breaker after Orthanc refused the machine's calling AE title; return the seconds until the next try.

        Like a rejected password, this needs a fix in Orthanc's DicomModalities or the
        inventory, so it is logged loudly once and then only counted.
        """
        with self._lock:
            self.probing = False
            now = self.clock()
            self.failures += 1
            self.last_error = f"Orthanc rejected the calling AE title of machine {self.machine_id}: {detail}"
            self.retry_at = now + AUTH_RETRY_S

            first = self.state != AUTH_REJECTED
            if first:
                self.state = AUTH_REJECTED
                self.opened_at = now
                self.reminded_at = now
            remind = not first and now - self.reminded_at >= REMINDER_S
            if remind:
                self.reminded_at = now
            failures = self.failures
            since = now - self.opened_at

        if first:
            log.error("%s. Sending for %s is stopped and its files stay queued. Register the machine's AE title "
                      "and this host's address in Orthanc's DicomModalities (deploy the central host again after "
                      "fixing the inventory); meanwhile the agent tries again every %.0f s.",
                      self.last_error, self.machine_id, AUTH_RETRY_S)
        elif remind:
            log.error("Orthanc still rejects the calling AE title of machine %s: %d attempts over %.0f s.",
                      self.machine_id, failures, since)
        else:
            log.debug("Orthanc rejected the calling AE title of machine %s again (attempt %d).",
                      self.machine_id, failures)
        return AUTH_RETRY_S

    def describe(self) -> str:
        """Return the state for the status file: sending, orthanc_unreachable or credentials_rejected."""
        with self._lock:
            state = self.state
        if state == UNREACHABLE:
            return "orthanc_unreachable"
        if state == AUTH_REJECTED:
            return "credentials_rejected"
        return "sending"
