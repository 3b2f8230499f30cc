"""Helpers for the dashboard, status and check tests: a local site with real Orthanc, SecantusDB,
sync, agents and dashboard processes. This module contains no tests.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pydicom
import pydicom.data
import pymongo
import requests
from pydicom.uid import generate_uid

from dicomfleet import credentials, localservers, render
from dicomfleet.dashboard import localrun
from dicomfleet.inventory import load_site

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
SITE = "dashtest"
STARTUP_TIMEOUT_S = 90.0

# Three agent machines, as in the lab; their hosts run on this machine.
MACHINES = {
    "ct1": {"modality": "CT", "ae_title": "CT_ROOM1", "location": "Radiology, CT room 1", "template": "CT_small.dcm"},
    "mr1": {"modality": "MR", "ae_title": "MR_ROOM1", "location": "Radiology, MRI suite", "template": "MR_small.dcm"},
    "xr1": {"modality": "CT", "ae_title": "XR_ROOM1", "location": "Emergency, X-ray room 1",
            "template": "CT_small.dcm"},
}


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Return PREDICATE's first true value, polling until TIMEOUT seconds; fail naming WHAT."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def make_instance(template: str, study_uid: str, series_uid: str, **tags) -> bytes:
    """Return a real DICOM file from pydicom's TEMPLATE with the given study and series and a new SOP UID."""
    dataset = pydicom.dcmread(TEST_FILES / template)
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for keyword, value in tags.items():
        setattr(dataset, keyword, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def heartbeat_body(machine_id: str, **changes) -> dict:
    """Return a valid heartbeat body as the agent sends it."""
    now = datetime.datetime.now().astimezone()
    body = {
        "machine": machine_id, "sent_at": now.isoformat(timespec="seconds"), "agent_version": "0.1.0",
        "host": machine_id, "transport": "rest", "state": "sending", "files_queued": 0,
        "files_sent_today": 0, "files_failed": 0, "files_quarantined": 0, "last_success_at": None,
        "last_error": None, "last_error_at": None, "oldest_queued_age_s": None, "free_bytes": 50 * 1024**3,
        "watch_folders": {f"/srv/{machine_id}": {"exists": True, "free_bytes": 50 * 1024**3,
                                                 "total_bytes": 100 * 1024**3}},
    }
    body.update(changes)
    return body


class DashboardSite:
    """A local site under FOLDER: inventory, Orthanc, SecantusDB, and the dashboard, sync and agents on demand."""

    def __init__(self, folder: Path, machine_vars: dict[str, dict] | None = None, central: dict | None = None,
                 heartbeat_interval_s: float = 30):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.mongo = localservers.SecantusProcess(folder / "secantus")
        machines = []
        for machine_id, details in MACHINES.items():
            watch = folder / "export" / machine_id
            watch.mkdir(parents=True, exist_ok=True)
            machine = {
                "name": machine_id,
                "ansible_host": "127.0.0.1",
                "ansible_connection": "local",
                "dicomfleet_machine_id": machine_id,
                "dicomfleet_ae_title": details["ae_title"],
                "dicomfleet_modality": details["modality"],
                "dicomfleet_location": details["location"],
                "dicomfleet_ingest": "agent",
                "dicomfleet_watch_folders": [str(watch)],
                "dicomfleet_agent_quiet_time_s": 0.5,
                "dicomfleet_agent_workers": 2,
                "dicomfleet_heartbeat_interval_s": heartbeat_interval_s,
            }
            machine.update((machine_vars or {}).get(machine_id, {}))
            machines.append(machine)
        self.port = localservers.free_port()
        central_vars = {"dicomfleet_orthanc_stable_age": 1, "dicomfleet_mongodb_uri": self.mongo.uri,
                        "dicomfleet_dashboard_port": self.port,
                        "dicomfleet_dashboard_url": f"http://127.0.0.1:{self.port}", **(central or {})}
        self.inventory = localservers.write_local_inventory(folder, machines, central=central_vars,
                                                            site_vars={"dicomfleet_site": SITE})
        self.site = load_site(self.inventory)
        self.secrets_root = folder / "secrets"
        self.orthanc = localservers.OrthancProcess(self.site, folder, self.secrets_root / SITE)
        self.secrets = self.orthanc.secrets
        self.dashboard: localrun.DashboardProcess | None = None
        self.sync: subprocess.Popen | None = None
        self.agents: dict[str, subprocess.Popen] = {}
        self._client: pymongo.MongoClient | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment under which a dicomfleet command finds this site's secrets."""
        return {**os.environ, "DICOMFLEET_SECRETS_DIR": str(self.secrets_root)}

    def start(self) -> "DashboardSite":
        """Start SecantusDB, Orthanc and the dashboard.

        The generous timeouts keep the suite reliable on a busy 2-core machine.
        """
        try:
            self.mongo.start(timeout=STARTUP_TIMEOUT_S)
            self.orthanc.start(timeout=STARTUP_TIMEOUT_S)
            self.start_dashboard()
        except BaseException:
            self.stop()
            raise
        return self

    def start_dashboard(self) -> localrun.DashboardProcess:
        """Start (or restart) the dashboard process."""
        config = localrun.write_dashboard_config(self.site, self.folder, self.secrets, self.mongo.uri,
                                                 port=self.port)
        self.dashboard = localrun.DashboardProcess(config, self.folder / "dashboard.log",
                                                   localrun.port_of(config)).start(timeout=STARTUP_TIMEOUT_S)
        return self.dashboard

    def stop(self) -> None:
        """Stop every process this site started."""
        for process in list(self.agents.values()) + ([self.sync] if self.sync else []):
            localservers.terminate(process, timeout=30)
        self.agents = {}
        self.sync = None
        if self.dashboard is not None:
            self.dashboard.stop()
        if self._client is not None:
            self._client.close()
        self.orthanc.stop()
        self.mongo.stop()

    # The dashboard

    @property
    def url(self) -> str:
        """The dashboard's base URL."""
        return self.dashboard.url

    @property
    def login(self) -> tuple[str, str]:
        """The dashboard's login user and password."""
        login = credentials.DEFAULT_DASHBOARD_LOGIN
        return login, self.secrets.dashboard_password(login)

    def token(self, machine_id: str) -> str:
        """The heartbeat token of MACHINE_ID."""
        return self.secrets.heartbeat_token(machine_id)

    def post_heartbeat(self, machine_id: str, body: dict | None = None, token: str | None = None,
                       **kwargs) -> requests.Response:
        """POST a heartbeat for MACHINE_ID with its own token unless TOKEN is given."""
        headers = {"Authorization": f"Bearer {token if token is not None else self.token(machine_id)}"}
        headers.update(kwargs.pop("headers", {}))
        if "data" not in kwargs:
            kwargs["json"] = body if body is not None else heartbeat_body(machine_id)
        return requests.post(f"{self.url}/api/v1/heartbeats/{machine_id}", headers=headers, timeout=10, **kwargs)

    def run_command(self, *arguments: str) -> subprocess.CompletedProcess:
        """Run ``dicomfleet ARGUMENTS`` with this site's secrets and return the completed process."""
        return subprocess.run([sys.executable, "-m", "dicomfleet", *arguments], capture_output=True, text=True,
                              env=self.env, timeout=300)

    def fleet(self) -> dict:
        """Return the dashboard's JSON fleet view."""
        answer = requests.get(self.url + "/api/v1/fleet", auth=self.login, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def machine_row(self, machine_id: str) -> dict:
        """Return MACHINE_ID's row of the JSON fleet view."""
        (row,) = [row for row in self.fleet()["machines"] if row["id"] == machine_id]
        return row

    def browser_session(self) -> requests.Session:
        """Return a requests session logged in through the login form."""
        session = requests.Session()
        page = session.get(self.url + "/login", timeout=10)
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        user, password = self.login
        answer = session.post(self.url + "/login", data={"csrf": csrf, "user": user, "password": password},
                              timeout=10)
        answer.raise_for_status()
        return session

    # MongoDB

    @property
    def database(self) -> pymongo.database.Database:
        """The site's MongoDB database, as the sync and the dashboard use it."""
        if self._client is None:
            self._client = pymongo.MongoClient(self.mongo.uri, tz_aware=True, serverSelectionTimeoutMS=5000)
        return self._client["dicomfleet"]

    # The sync and the agents

    def start_sync(self) -> subprocess.Popen:
        """Start the sync with a configuration rendered from the project's template."""
        server = self.orthanc.server
        context = render.server_context(self.site, server, self.secrets)
        text = render.render_template("sync.toml.j2", context)
        password_file = self.folder / "sync-secrets" / "orthanc-sync"
        password_file.parent.mkdir(exist_ok=True)
        password_file.write_text(self.secrets.orthanc_password(credentials.SYNC_USER) + "\n")
        password_file.chmod(0o600)
        lines = []
        for line in text.splitlines():
            lines.append(line)
            if line.startswith("credential = "):
                lines.append(f"password_file = {json.dumps(str(password_file))}")
        config = self.folder / "sync.toml"
        config.write_text("\n".join(lines) + "\n")
        log = open(self.folder / "sync.log", "ab")
        self.sync = subprocess.Popen([sys.executable, "-m", "dicomfleet", "sync", "--config", str(config)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self.sync

    def start_agent(self, machine_id: str) -> subprocess.Popen:
        """Start the agent of MACHINE_ID with its configuration rendered from the project's template."""
        folder = self.folder / f"agent-{machine_id}"
        config = localservers.write_agent_config(self.site, machine_id, folder, self.secrets)

        # The deployed agent reads its heartbeat token from a systemd credential; a local run from a folder.
        tokens = folder / "heartbeat-tokens"
        tokens.mkdir(exist_ok=True)
        (tokens / f"heartbeat-{machine_id}").write_text(self.token(machine_id) + "\n")
        text = config.read_text()
        assert "\n[heartbeat]\n" in text
        config.write_text(text.replace("\n[heartbeat]\n", f"\n[heartbeat]\ntoken_folder = {json.dumps(str(tokens))}\n"))

        log = open(self.folder / f"agent-{machine_id}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "dicomfleet", "agent", "--config", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.agents[machine_id] = process
        return process

    def agent_status_file(self, machine_id: str) -> Path:
        """The status file the local agent of MACHINE_ID writes."""
        return self.folder / f"agent-{machine_id}" / "agent-state" / "status.json"

    def agent_password_file(self, machine_id: str) -> Path:
        """The file the local agent of MACHINE_ID reads its Orthanc password from."""
        return self.folder / f"agent-{machine_id}" / "agent-secrets" / f"orthanc-{machine_id}"

    def drop(self, machine_id: str, name: str, data: bytes) -> Path:
        """Write DATA into MACHINE_ID's watch folder as a scanner would: a temporary name, then a rename."""
        folder = self.folder / "export" / machine_id
        partial = folder / f".{name}.part"
        partial.write_bytes(data)
        final = folder / name
        partial.rename(final)
        return final
