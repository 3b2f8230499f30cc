"""Send the agent's counters to the dashboard as one heartbeat per machine, every interval_s seconds.

Heartbeats run in their own thread with short timeouts, so a dashboard that is
down or slow never delays sending images. A failed heartbeat is retried with
growing delays up to the interval; each machine authenticates with its own
token, read from systemd's credential ``heartbeat-MACHINE``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from dicomfleet.agent.httpclient import HttpClient, RequestFailed
from dicomfleet.agent.repeats import RepeatedProblems

log = logging.getLogger(__name__)

CREDENTIAL_PREFIX = "heartbeat-"
FIRST_RETRY_S = 5.0
DEFAULT_INTERVAL_S = 30.0
DEFAULT_TIMEOUT_S = 5.0


class HeartbeatConfigError(Exception):
    """Raised with every problem of the agent configuration's [heartbeat] table."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclasses.dataclass(frozen=True)
class HeartbeatSettings:
    """The dashboard's heartbeat URL, the interval and the token source of the agent's heartbeats."""

    # The dashboard's heartbeat API; the machine id is appended to it.
    url: str
    interval_s: float = DEFAULT_INTERVAL_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    # A folder of files named heartbeat-MACHINE, read when no systemd credential exists (local runs).
    token_folder: Path | None = None
    # The CA certificate that verifies an https:// dashboard; None trusts the system's CAs.
    ca_file: Path | None = None


def parse_heartbeat_table(table: Any, where: str) -> HeartbeatSettings:
    """Check the [heartbeat] TABLE of the agent configuration WHERE and return its settings."""
    problems = []
    if not isinstance(table, dict):
        raise HeartbeatConfigError([f"{where}: [heartbeat] must be a table."])

    known = ("url", "interval_s", "timeout_s", "token_folder", "ca_file")
    for key in table:
        if key not in known:
            problems.append(f"{where}: [heartbeat] unknown key {key!r} (known keys: {', '.join(known)}).")

    url = table.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{where}: [heartbeat] url = {url!r} must be the dashboard's http:// or https:// "
                        "heartbeat URL, such as \"https://pacs.example/api/v1/heartbeats\".")
    for key, default in (("interval_s", DEFAULT_INTERVAL_S), ("timeout_s", DEFAULT_TIMEOUT_S)):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"{where}: [heartbeat] {key} = {value!r} must be a number of seconds above 0.")
    folder = table.get("token_folder")
    if folder is not None and (not isinstance(folder, str) or not folder.startswith("/")):
        problems.append(f"{where}: [heartbeat] token_folder = {folder!r} must be an absolute folder path.")
    ca_file = table.get("ca_file")
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file.startswith("/")):
        problems.append(f"{where}: [heartbeat] ca_file = {ca_file!r} must be the absolute path of a PEM "
                        "certificate, such as \"/etc/dicomfleet/tls/site-ca.pem\".")
    if problems:
        raise HeartbeatConfigError(problems)

    return HeartbeatSettings(
        url=str(url).rstrip("/"),
        interval_s=float(table.get("interval_s", DEFAULT_INTERVAL_S)),
        timeout_s=float(table.get("timeout_s", DEFAULT_TIMEOUT_S)),
        token_folder=Path(folder) if folder else None,
        ca_file=Path(ca_file) if ca_file else None,
    )


def read_token(settings: HeartbeatSettings, machine_id: str) -> str | None:
    """Return MACHINE_ID's heartbeat token from $CREDENTIALS_DIRECTORY, else from token_folder; None if absent."""
    name = CREDENTIAL_PREFIX + machine_id
    candidates = []
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        candidates.append(Path(directory) / name)
    if settings.token_folder is not None:
        candidates.append(settings.token_folder / name)

    for path in candidates:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except OSError as error:
            log.error("Cannot read the heartbeat token of machine %s from %s: %s.", machine_id, path, error)
            return None
        if token:
            return token
    return None


def _smallest_free(folders: dict[str, dict]) -> int | None:
    values = [entry.get("free_bytes") for entry in folders.values() if entry.get("free_bytes") is not None]
    return min(values) if values else None


def heartbeat_body(document: dict, machine_id: str, now: datetime.datetime | None = None) -> dict:
    """Return the heartbeat of MACHINE_ID built from the agent's status DOCUMENT (status.build_status)."""
    machine = document["machines"][machine_id]
    folders = machine.get("watch_folders", {})
    now = now or datetime.datetime.now().astimezone()
    return {
        "machine": machine_id,
        "sent_at": now.isoformat(timespec="seconds"),
        "agent_version": document.get("agent_version", ""),
        "host": document.get("host", ""),
        "transport": machine.get("transport"),
        "state": machine.get("state"),
        "files_queued": machine.get("files_queued", 0),
        "files_sent_today": machine.get("files_sent_today", 0),
        "files_failed": machine.get("files_failed", 0),
        "files_quarantined": machine.get("files_quarantined", 0),
        "files_quarantined_today": machine.get("files_quarantined_today", 0),
        "last_success_at": machine.get("last_success_at"),
        "last_error": machine.get("last_error"),
        "last_error_at": machine.get("last_error_at"),
        "oldest_queued_age_s": machine.get("oldest_queued_age_s"),
        "free_bytes": _smallest_free(folders),
        "watch_folders": folders,
    }


class HeartbeatSender:
    """A daemon thread that posts each machine's heartbeat; STATUS returns the agent's status document."""

    def __init__(self, settings: HeartbeatSettings, machine_ids: list[str], status: Callable[[], dict],
                 stop: threading.Event):
        self.settings = settings
        self.machine_ids = list(machine_ids)
        self.status = status
        self.stop = stop
        self.problems = RepeatedProblems(log)
        self.sent = 0
        self.failed = 0
        self._client = HttpClient(connect_timeout=settings.timeout_s)
        self._verify: bool | str = str(settings.ca_file) if settings.ca_file is not None else True
        self.thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        log.info("Sending heartbeats of machines %s to %s every %.0f s.", ", ".join(self.machine_ids),
                 self.settings.url, self.settings.interval_s)
        self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread after STOP was set; a heartbeat in flight ends within timeout_s."""
        self.thread.join(timeout)
        self._client.close()

    def send_once(self) -> bool:
        """Send one heartbeat per machine now; return True when every one was accepted."""
        try:
            document = self.status()
        except Exception as error:
            # The status is built from the spool; a spool error must not end the heartbeats.
            self.problems.report("status", f"Cannot build the status for the heartbeat: {error}.")
            return False
        self.problems.clear("status", "The status for the heartbeat is readable again.")

        all_accepted = True
        for machine_id in self.machine_ids:
            if not self._send_machine(document, machine_id):
                all_accepted = False
        return all_accepted

    def _send_machine(self, document: dict, machine_id: str) -> bool:
        token = read_token(self.settings, machine_id)
        if token is None:
            self.problems.report(("token", machine_id),
                                 f"No heartbeat token for machine {machine_id}: expected the systemd credential "
                                 f"{CREDENTIAL_PREFIX}{machine_id}; the dashboard will show it offline.")
            return False
        self.problems.clear(("token", machine_id), f"The heartbeat token of machine {machine_id} is readable.")

        url = f"{self.settings.url}/{machine_id}"
        try:
            body = json.dumps(heartbeat_body(document, machine_id)).encode("utf-8")
            answer = self._client.request("POST", url, body=body, verify=self._verify, timeout=self.settings.timeout_s,
                                          headers={"Authorization": f"Bearer {token}",
                                                   "Content-Type": "application/json"})
        except RequestFailed as error:
            self.failed += 1
            self.problems.report(("send", machine_id), f"Heartbeat of machine {machine_id} to {url} failed: "
                                                       f"{error}; retrying later.")
            return False

        if answer.status != 200:
            self.failed += 1
            reason = answer.text.strip()[:200]
            self.problems.report(("send", machine_id), f"The dashboard rejected the heartbeat of machine "
                                                       f"{machine_id} with HTTP {answer.status}: {reason}")
            return False

        self.sent += 1
        self.problems.clear(("send", machine_id), f"Heartbeats of machine {machine_id} are accepted again.")
        return True

    def _run(self) -> None:
        delay = FIRST_RETRY_S
        while not self.stop.is_set():
            if self.send_once():
                delay = FIRST_RETRY_S
                wait = self.settings.interval_s
            else:
                wait = min(delay, self.settings.interval_s)
                delay = min(delay * 2, self.settings.interval_s)
            self.stop.wait(wait)
