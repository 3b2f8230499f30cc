"""Helpers for the agent's tests: real DICOM files, a real Orthanc and the agent as a subprocess.

DICOM input comes from pydicom's own test files; each generated instance gets
fresh UIDs, so Orthanc stores every file as a distinct instance.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pydicom
import pydicom.data
import requests
from pydicom.uid import generate_uid

from dicomfleet import localservers, render
from dicomfleet.inventory import load_site

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
MACHINE_ID = "ct1"


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
               message: str = "condition") -> object:
    """Return PREDICATE's first truthy result, polling until TIMEOUT seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def make_instance(template: str = "CT_small.dcm", **attributes) -> bytes:
    """Return a copy of a pydicom test file with new SOP, series and study UIDs, encoded as Part 10."""
    dataset = pydicom.dcmread(PYDICOM_FILES / template)
    sop_uid = generate_uid()
    dataset.SOPInstanceUID = sop_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
    dataset.SeriesInstanceUID = attributes.pop("series_uid", None) or generate_uid()
    dataset.StudyInstanceUID = attributes.pop("study_uid", None) or generate_uid()
    for name, value in attributes.items():
        setattr(dataset, name, value)

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def sop_instance_uid(data: bytes) -> str:
    """Return the SOP Instance UID of the encoded DICOM file DATA."""
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def md5(data: bytes) -> str:
    """Return the hexadecimal MD5 of DATA, as Orthanc reports it for an attachment."""
    return hashlib.md5(data).hexdigest()


class AgentProcess:
    """The agent running as a real subprocess, with its stderr in a log file."""

    def __init__(self, config: Path, log_path: Path, log_level: str = "DEBUG", prefix: list[str] | None = None,
                 env: dict | None = None):
        self.log_path = log_path
        self.handle = open(log_path, "ab")
        command = [*(prefix or []), sys.executable, "-m", "dicomfleet", "agent", "--config", str(config),
                   "--log-level", log_level]
        self.process = subprocess.Popen(command, stdout=self.handle, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})

    def log_text(self) -> str:
        """Return everything the agent logged so far, across restarts into the same file."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 15.0) -> str:
        """Wait until the log contains TEXT at least COUNT times; return the log.

        The agent logs "Stored file" only after Orthanc has the instance, so a test
        that saw the instance in Orthanc waits here before it reads the log or the spool.
        """
        def enough_lines() -> str | None:
            log = self.log_text()
            if log.count(text) >= count:
                return log
            return None

        return wait_until(enough_lines, timeout, interval=0.05, message=f"{count} log lines containing {text!r}")

    def stop(self, timeout: float = 30.0) -> int:
        """Send SIGTERM and return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.handle.close()

    def kill(self) -> None:
        """Kill the agent with SIGKILL, as a crash or power cut would."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.handle.close()


def source_machine_of(site, orthanc: localservers.OrthancProcess, instance_id: str) -> str | None:
    """Return the machine the sync of SITE names as the source of INSTANCE_ID, in ORTHANC."""
    server = next(iter(site.servers.values()))
    metadata = orthanc.get(f"/instances/{instance_id}/metadata?expand")
    return render.sync_machine_directory(site, server, orthanc.secrets).resolve(metadata).machine_id


class AgentSite:
    """A local site: a real Orthanc, one machine's watch folder, and the agent config rendered for it."""

    def __init__(self, folder: Path, machine_vars: dict | None = None):
        self.folder = folder
        self.watch = folder / "export"
        self.watch.mkdir(parents=True, exist_ok=True)
        machine = {
            "name": MACHINE_ID,
            "ansible_host": "127.0.0.1",
            "dicomfleet_machine_id": MACHINE_ID,
            "dicomfleet_ae_title": "CT_ROOM1",
            "dicomfleet_modality": "CT",
            "dicomfleet_location": "Radiology, CT room 1",
            "dicomfleet_ingest": "agent",
            "dicomfleet_watch_folders": [str(self.watch)],
            "dicomfleet_agent_quiet_time_s": 0.5,
            "dicomfleet_agent_workers": 2,
        }
        machine.update(machine_vars or {})
        inventory = localservers.write_local_inventory(folder, [machine])
        self.site = load_site(inventory)
        self.orthanc = localservers.OrthancProcess(self.site, folder)
        self.agents: list[AgentProcess] = []
        self.config_path: Path | None = None

    @property
    def state(self) -> Path:
        """The agent's state folder: spool, quarantine and status file."""
        return self.folder / "agent-state"

    @property
    def password_file(self) -> Path:
        """The file the agent reads the machine's Orthanc password from."""
        return self.folder / "agent-secrets" / f"orthanc-{MACHINE_ID}"

    @property
    def log_path(self) -> Path:
        """The agent's log, appended to by every start."""
        return self.folder / "agent.log"

    def write_config(self, polling: bool = False) -> Path:
        """Render the machine's agent.toml as the project's template writes it.

        POLLING turns the machine into a polled one, as the template renders a
        machine whose ingest path is a network share.
        """
        path = localservers.write_agent_config(self.site, MACHINE_ID, self.folder, self.orthanc.secrets)
        if polling:
            text = path.read_text(encoding="utf-8")
            assert "polling = false" in text
            path.write_text(text.replace("polling = false", "polling = true"), encoding="utf-8")
        self.config_path = path
        return path

    def reset(self) -> None:
        """Give the next test an empty watch folder, a new agent state and an empty Orthanc."""
        self.stop_agents()
        if self.orthanc.process is None:
            self.orthanc.start()

        for child in self.watch.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        shutil.rmtree(self.state, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)
        self.config_path = None

        for patient in self.orthanc.get("/patients"):
            answer = requests.delete(f"{self.orthanc.url}/patients/{patient}", auth=self.orthanc.admin_auth,
                                     timeout=30)
            answer.raise_for_status()

    def stop_agents(self) -> None:
        """Stop every agent started here that still runs."""
        for agent in self.agents:
            if agent.process.poll() is None:
                agent.stop()
        self.agents = []

    def start_agent(self, log_level: str = "DEBUG", prefix: list[str] | None = None) -> AgentProcess:
        """Start the agent as a subprocess; wait until its watcher logged that it watches the folder."""
        if self.config_path is None:
            self.write_config()
        before = self.log_path.read_text(errors="replace").count("Watching ") if self.log_path.exists() else 0
        agent = AgentProcess(self.config_path, self.log_path, log_level, prefix)
        self.agents.append(agent)
        wait_until(lambda: agent.log_text().count("Watching ") > before or agent.process.poll() is not None,
                   timeout=20, message="the agent to start watching")
        assert agent.process.poll() is None, agent.log_text()
        return agent

    def stop_all(self) -> None:
        """Stop every agent started here, then Orthanc."""
        self.stop_agents()
        self.orthanc.stop()

    # Orthanc

    def statistics(self) -> dict:
        """Return Orthanc's /statistics."""
        return self.orthanc.get("/statistics")

    def instance_of(self, sop_uid: str) -> str | None:
        """Return the Orthanc ID of the instance with SOP_UID, or None when Orthanc does not have it."""
        answer = requests.post(self.orthanc.url + "/tools/lookup", data=sop_uid, auth=self.orthanc.admin_auth,
                               timeout=10)
        answer.raise_for_status()
        for item in answer.json():
            if item["Type"] == "Instance":
                return item["ID"]
        return None

    def source_machine(self, instance_id: str) -> str | None:
        """Return the machine the sync names as an instance's source, from the metadata Orthanc recorded."""
        return source_machine_of(self.site, self.orthanc, instance_id)

    def stored_md5(self, instance_id: str) -> str:
        """Return the MD5 of the DICOM file Orthanc stored for an instance."""
        answer = requests.get(f"{self.orthanc.url}/instances/{instance_id}/attachments/dicom/md5",
                              auth=self.orthanc.admin_auth, timeout=10)
        answer.raise_for_status()
        return answer.text.strip()

    def wait_stored(self, sop_uids: list[str], timeout: float = 20.0) -> dict[str, str]:
        """Wait until Orthanc has every SOP Instance UID; return their Orthanc IDs."""
        found: dict[str, str] = {}
        # Counting first is one request per poll instead of one per instance.
        wait_until(lambda: self.statistics()["CountInstances"] >= len(sop_uids), timeout, interval=0.1,
                   message=f"{len(sop_uids)} instances in Orthanc")

        def all_found() -> bool:
            for uid in sop_uids:
                if uid not in found:
                    instance = self.instance_of(uid)
                    if instance:
                        found[uid] = instance
            return len(found) == len(sop_uids)

        wait_until(all_found, timeout, interval=0.2,
                   message=f"{len(sop_uids)} instances in Orthanc (have {len(found)})")
        return found

    # Agent state

    def spool_rows(self) -> list[dict]:
        """Return the spool's records as dicts, read with a separate SQLite connection."""
        connection = sqlite3.connect(str(self.state / "spool.sqlite3"), timeout=10)
        connection.row_factory = sqlite3.Row
        try:
            rows = connection.execute("SELECT * FROM files ORDER BY id").fetchall()
        finally:
            connection.close()
        result = []
        for row in rows:
            record = dict(row)
            record["path"] = os.fsdecode(record["path"])
            result.append(record)
        return result

    def status(self) -> dict:
        """Return the agent's status file."""
        return json.loads((self.state / "status.json").read_text(encoding="utf-8"))

    def quarantined(self) -> list[Path]:
        """Return the files in the machine's quarantine folder, without reason notes."""
        folder = self.state / "quarantine" / MACHINE_ID
        if not folder.exists():
            return []
        return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".reason.txt"))


def make_test_ca(folder: Path) -> tuple[Path, Path]:
    """Create a CA and a certificate for 127.0.0.1 signed by it, with the openssl command.

    Returns the CA certificate file and the server's certificate chain with its key, both PEM.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*arguments: str) -> None:
        subprocess.run(["openssl", *arguments], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=dicomfleet test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    bundle = folder / "server-bundle.pem"
    bundle.write_bytes((folder / "server.pem").read_bytes() + (folder / "server.key").read_bytes())
    return folder / "ca.pem", bundle


class TlsTunnel:
    """A TLS front on a loopback port that forwards each connection to a plain HTTP port, like nginx would."""

    def __init__(self, certificate: Path, target_port: int):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certificate))
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except (OSError, ssl.SSLError):
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pump, args=(upstream, secure), daemon=True).start()
        self._pump(secure, upstream)

    @staticmethod
    def _pump(source: socket.socket, destination: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                destination.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, destination):
                try:
                    end.close()
                except OSError:
                    pass

    def close(self) -> None:
        """Stop accepting connections."""
        self.closed.set()
        self.listener.close()
