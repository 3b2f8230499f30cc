"""Fixtures and helpers for the sync's tests: real Orthanc, real SecantusDB, the sync as a subprocess.

This module contains no tests; the test_sync_* modules import its fixtures.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pydicom
import pydicom.data
import pymongo
import pytest
import requests
from pydicom.uid import generate_uid

from dicomfleet import credentials, localservers, render
from dicomfleet.inventory import load_site

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
CHARSET_FILES = Path(pydicom.data.__file__).parent / "charset_files"
SYNC_USER = credentials.SYNC_USER

MACHINES = [
    {"name": "ct1", "ansible_host": "127.0.0.1", "dicomfleet_machine_id": "ct1", "dicomfleet_ae_title": "CT1",
     "dicomfleet_modality": "CT", "dicomfleet_location": "CT room 1", "dicomfleet_ingest": "agent",
     "dicomfleet_watch_folders": ["/srv/dicom/ct1"]},
    {"name": "mr1", "ansible_host": "127.0.0.1", "dicomfleet_machine_id": "mr1", "dicomfleet_ae_title": "MR1",
     "dicomfleet_modality": "MR", "dicomfleet_location": "MRI suite", "dicomfleet_ingest": "agent",
     "dicomfleet_watch_folders": ["/srv/dicom/mr1"]},
    {"name": "us1", "ansible_host": "127.0.0.1", "dicomfleet_machine_id": "us1", "dicomfleet_ae_title": "US1",
     "dicomfleet_modality": "US", "dicomfleet_location": "Ultrasound cart", "dicomfleet_ingest": "dicom",
     "dicomfleet_dicom_port": 11112},
]


def make_instance(study_uid: str, series_uid: str | None = None, *, base: Path = TEST_FILES / "CT_small.dcm",
                  tags: dict[str, Any] | None = None, remove: tuple[str, ...] = ()) -> bytes:
    """Return a real DICOM file from BASE with new UIDs, TAGS set by keyword and REMOVE deleted."""
    dataset = pydicom.dcmread(base)
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid or generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for keyword, value in (tags or {}).items():
        setattr(dataset, keyword, value)
    for keyword in remove:
        if keyword in dataset:
            delattr(dataset, keyword)

    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def wait_until(predicate: Callable[[], Any], timeout: float, description: str, interval: float = 0.2) -> Any:
    """Return PREDICATE's first true value, polling until TIMEOUT seconds; fail the test naming DESCRIPTION."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        time.sleep(interval)


class SyncEnvironment:
    """One Orthanc, one SecantusDB and the sync configuration that joins them, all under FOLDER."""

    def __init__(self, folder: Path, central: dict | None = None, on_delete: str | None = None,
                 reconcile_interval_s: float | None = None, replica_set: bool = False):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        # StableAge 1 s instead of the test inventory's 2 s keeps each wait for a stable study short.
        central = {"dicomfleet_orthanc_stable_age": 1, **(central or {})}
        inventory = localservers.write_local_inventory(folder, MACHINES, central=central)
        self.site = load_site(inventory)
        self.orthanc = localservers.OrthancProcess(self.site, folder)
        self.mongo = localservers.SecantusProcess(folder / "secantus")
        self.on_delete = on_delete
        self.reconcile_interval_s = reconcile_interval_s
        self.replica_set = replica_set
        self.sync: subprocess.Popen | None = None
        self.sync_runs = 0
        self.log_path = folder / "sync.log"
        self.config_path = folder / "sync.toml"
        self._client: pymongo.MongoClient | None = None

    @property
    def mongodb_uri(self) -> str:
        """The SecantusDB URI the sync writes to (SecantusDB reports the replica set name "secantus")."""
        if self.replica_set:
            return self.mongo.uri + "?replicaSet=secantus"
        return self.mongo.uri

    def start_servers(self) -> "SyncEnvironment":
        """Start Orthanc and SecantusDB and write the sync configuration."""
        self.orthanc.start()
        self.mongo.start()
        self.write_config()
        return self

    def write_config(self, extra: str = "") -> Path:
        """Render sync.toml from the template for a local run, then append EXTRA."""
        server = self.orthanc.server
        context = render.server_context(self.site, server, self.orthanc.secrets)
        text = render.render_template("sync.toml.j2", context)

        password_file = self.folder / "sync-secrets" / "orthanc-sync"
        password_file.parent.mkdir(exist_ok=True)
        password_file.write_text(self.orthanc.secrets.orthanc_password(SYNC_USER) + "\n")
        password_file.chmod(0o600)

        lines = []
        for line in text.splitlines():
            if line.startswith("uri = "):
                line = f"uri = {json.dumps(self.mongodb_uri)}"
            if line.startswith("on_delete = ") and self.on_delete:
                line = f"on_delete = {json.dumps(self.on_delete)}"
            if line.startswith("interval_s = ") and self.reconcile_interval_s is not None:
                line = f"interval_s = {self.reconcile_interval_s}"
            lines.append(line)
            if line.startswith("credential = "):
                lines.append(f"password_file = {json.dumps(str(password_file))}")
        self.config_path.write_text("\n".join(lines) + "\n" + extra)
        return self.config_path

    def start_sync(self) -> subprocess.Popen:
        """Start ``dicomfleet sync`` as a subprocess logging into sync.log (appended across runs)."""
        self.sync_runs += 1
        log = open(self.log_path, "a", encoding="utf-8")
        log.write(f"--- sync run {self.sync_runs}\n")
        log.flush()
        self.sync = subprocess.Popen(
            [sys.executable, "-m", "dicomfleet", "sync", "--config", str(self.config_path)],
            stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        return self.sync

    def stop_sync(self, sig: int = signal.SIGTERM) -> int:
        """Send SIG to the sync and return its exit status."""
        process = self.sync
        if process is None:
            return 0
        self.sync = None
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError("the sync did not exit within 30 s of the signal")

    def run_reconcile(self, *options: str) -> subprocess.CompletedProcess:
        """Run ``dicomfleet sync reconcile`` once and return its completed process."""
        return subprocess.run(
            [sys.executable, "-m", "dicomfleet", "sync", "reconcile", "--config", str(self.config_path), *options],
            capture_output=True, text=True, timeout=120,
        )

    def log_text(self) -> str:
        """Return everything the sync has logged so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8")

    @property
    def client(self) -> pymongo.MongoClient:
        """A pymongo client on SecantusDB for the test's own reads."""
        if self._client is None:
            self._client = pymongo.MongoClient(self.mongo.uri, tz_aware=True, serverSelectionTimeoutMS=5000)
        return self._client

    @property
    def studies(self) -> pymongo.collection.Collection:
        """The ``studies`` collection the sync writes to."""
        return self.client["dicomfleet"]["studies"]

    @property
    def checkpoints(self) -> pymongo.collection.Collection:
        """The ``sync_checkpoints`` collection."""
        return self.client["dicomfleet"]["sync_checkpoints"]

    def records_of(self, study_uid: str) -> list[dict]:
        """Return every record of STUDY_UID."""
        return list(self.studies.find({"studyInstanceUID": study_uid}))

    def wait_for_record(self, study_uid: str, timeout: float = 30,
                        condition: Callable[[dict], bool] = lambda record: True) -> dict:
        """Wait until the record of STUDY_UID exists and meets CONDITION; return it."""
        def ready():
            record = self.studies.find_one({"studyInstanceUID": study_uid})
            if record is not None and condition(record):
                return record
            return None

        return wait_until(ready, timeout, f"the record of study {study_uid}")

    def upload(self, data: bytes, machine: str | None = "ct1", source_machine: str | None = None) -> str:
        """POST DATA to Orthanc as MACHINE's own user (the administrator when None); return the instance id.

        With SOURCE_MACHINE, write the SourceMachine metadata as the agent does.
        """
        auth = self.orthanc.auth_of(machine) if machine else self.orthanc.admin_auth
        answer = requests.post(self.orthanc.url + "/instances", data=data, auth=auth, timeout=30)
        answer.raise_for_status()
        instance_id = answer.json()["ID"]
        if source_machine is not None:
            put = requests.put(f"{self.orthanc.url}/instances/{instance_id}/metadata/SourceMachine",
                               data=source_machine, auth=auth, timeout=30)
            put.raise_for_status()
        return instance_id

    def orthanc_delete(self, path: str) -> int:
        """DELETE PATH in Orthanc as the administrator and return the HTTP status."""
        return requests.delete(self.orthanc.url + path, auth=self.orthanc.admin_auth, timeout=30).status_code

    def orthanc_study_id(self, instance_id: str) -> str:
        """Return the Orthanc id of the study holding INSTANCE_ID."""
        return self.orthanc.get(f"/instances/{instance_id}/study")["ID"]

    def wipe_orthanc(self) -> None:
        """Stop Orthanc, delete its storage and index, and start it again on the same port, empty."""
        self.orthanc.stop()
        shutil.rmtree(self.folder / "orthanc-storage", ignore_errors=True)
        self.orthanc.start()

    def close(self) -> None:
        """Stop the sync and both servers."""
        try:
            self.stop_sync(signal.SIGKILL)
        except AssertionError:
            pass
        if self._client is not None:
            self._client.close()

        # The servers' data is thrown away, so a kill saves their two-second clean shutdowns.
        for server in (self.orthanc, self.mongo):
            if server.process is not None and server.process.poll() is None:
                server.process.kill()
        self.orthanc.stop()
        self.mongo.stop()


@pytest.fixture
def sync_environment(tmp_path):
    """Return a factory of started SyncEnvironments under the test's folder; all are stopped afterwards."""
    created: list[SyncEnvironment] = []

    def create(**options) -> SyncEnvironment:
        environment = SyncEnvironment(tmp_path / f"env{len(created)}", **options)
        created.append(environment)
        return environment.start_servers()

    yield create
    for environment in created:
        environment.close()


@pytest.fixture(scope="module")
def running_sync(tmp_path_factory):
    """A SyncEnvironment with the sync running, shared by the tests of one module."""
    folder = tmp_path_factory.mktemp("sync")
    environment = SyncEnvironment(folder, replica_set=True)
    try:
        environment.start_servers()
        environment.start_sync()
        wait_until(lambda: "Reconcile found" in environment.log_text(), 30, "the sync's first reconcile")
        yield environment
    finally:
        environment.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A SyncEnvironment with Orthanc and SecantusDB but no sync process, shared by one module."""
    folder = tmp_path_factory.mktemp("servers")
    environment = SyncEnvironment(folder)
    try:
        yield environment.start_servers()
    finally:
        environment.close()
