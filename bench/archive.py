"""The Orthanc every benchmark stores into: real Orthanc 1.10 on loopback ports, emptied between runs.

Its inventory registers the benchmark's clients: a REST user for the raw HTTP clients, the
agent's machines (REST and C-STORE), and the AE title of the DICOM clients at 127.0.0.1.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import requests

from dicomfleet import localservers
from dicomfleet.inventory import Site, load_site

log = logging.getLogger(__name__)

# The raw REST clients (curl, requests) log in as this machine's Orthanc user.
REST_CLIENT = "bench-rest"
# The machine whose export folder the agent watches, sending over REST.
AGENT_MACHINE = "bench-agent"
# The same, sending over C-STORE from its AE title at 127.0.0.1.
CSTORE_MACHINE = "bench-cstore"
# DCMTK and pynetdicom send C-STORE with this AE title from 127.0.0.1.
DICOM_CLIENT = "bench-dicom"
DICOM_CLIENT_AET = "BENCHSCU"


def bench_machines(agent_folder: Path) -> list[dict]:
    """Return the inventory machines of the benchmark site; AGENT_FOLDER is the REST agent's export folder."""
    common = {"ansible_host": "127.0.0.1", "dicomfleet_modality": "CT"}
    return [
        {"name": REST_CLIENT, **common, "dicomfleet_machine_id": REST_CLIENT,
         "dicomfleet_ae_title": "BENCHREST", "dicomfleet_location": "Benchmark REST clients",
         "dicomfleet_ingest": "agent", "dicomfleet_watch_folders": [str(agent_folder.parent / "unused")]},
        {"name": AGENT_MACHINE, **common, "dicomfleet_machine_id": AGENT_MACHINE,
         "dicomfleet_ae_title": "BENCHAGENT", "dicomfleet_location": "Benchmark agent",
         "dicomfleet_ingest": "agent", "dicomfleet_watch_folders": [str(agent_folder)]},
        {"name": CSTORE_MACHINE, **common, "dicomfleet_machine_id": CSTORE_MACHINE,
         "dicomfleet_ae_title": "BENCHCSTORE", "dicomfleet_location": "Benchmark agent over C-STORE",
         "dicomfleet_ingest": "agent", "dicomfleet_transport": "cstore",
         "dicomfleet_watch_folders": [str(agent_folder.parent / "cstore-export")]},
        {"name": DICOM_CLIENT, **common, "dicomfleet_machine_id": DICOM_CLIENT,
         "dicomfleet_ae_title": DICOM_CLIENT_AET, "dicomfleet_location": "Benchmark DICOM clients",
         "dicomfleet_ingest": "dicom"},
    ]


class BenchArchive:
    """A local Orthanc for the benchmarks, with helpers to empty it and to wait for instances."""

    def __init__(self, folder: Path, machines: list[dict], central: dict | None = None):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        inventory = localservers.write_local_inventory(folder, machines, central=central)
        self.site: Site = load_site(inventory)
        self.orthanc = localservers.OrthancProcess(self.site, folder)
        self.storage = Path(self.orthanc.server.vars["dicomfleet_orthanc_storage_directory"])
        self.session = requests.Session()
        self.session.auth = self.orthanc.admin_auth

    @property
    def url(self) -> str:
        """Orthanc's REST base URL."""
        return self.orthanc.url

    @property
    def dicom_port(self) -> int:
        """Orthanc's DICOM port."""
        return self.orthanc.server.dicom_port

    @property
    def aet(self) -> str:
        """Orthanc's AE title."""
        return self.orthanc.server.aet

    def password_of(self, username: str) -> str:
        """Return the Orthanc password of USERNAME."""
        return self.orthanc.auth_of(username)[1]

    def start(self) -> "BenchArchive":
        """Start Orthanc on an empty storage folder."""
        shutil.rmtree(self.storage, ignore_errors=True)
        self.orthanc.start()
        log.info("Orthanc started at %s with an empty storage %s.", self.url, self.storage)
        return self

    def reset(self) -> None:
        """Stop Orthanc, delete its storage and index, and start it again empty."""
        self.orthanc.stop()
        self.start()

    def stop(self) -> None:
        """Stop Orthanc."""
        self.session.close()
        self.orthanc.stop()

    def statistics(self) -> dict:
        """Return Orthanc's /statistics."""
        answer = self.session.get(self.url + "/statistics", timeout=30)
        answer.raise_for_status()
        return answer.json()

    def count_instances(self) -> int:
        """Return how many instances Orthanc stores."""
        return int(self.statistics()["CountInstances"])

    def wait_for_instances(self, count: int, timeout: float, interval: float = 0.025) -> float | None:
        """Poll /statistics until it shows COUNT instances; return the monotonic time seen, or None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.count_instances() >= count:
                return time.monotonic()
            if time.monotonic() > deadline:
                return None
            time.sleep(interval)

    def changes(self, since: int, limit: int = 1000) -> dict:
        """Return one page of Orthanc's change feed after SINCE."""
        answer = self.session.get(self.url + "/changes", params={"since": since, "limit": limit}, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def last_change(self) -> int:
        """Return the sequence number of the newest change."""
        answer = self.session.get(self.url + "/changes", params={"last": ""}, timeout=30)
        answer.raise_for_status()
        return int(answer.json()["Last"])
