"""Measure the sync as a real ``dicomfleet sync`` process against Orthanc and SecantusDB.

Figures: the delay from a StableStudy change to the study's record, the catch-up rate
on a backlog, and the bytes of an idle cycle against today's full listing every 30 s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pymongo
import requests

from dicomfleet import credentials, localservers, render

from bench import dataset
from bench.archive import REST_CLIENT, BenchArchive
from bench.byte_counter import CountingProxy, HTTPRequestCounter, MongoMessageCounter, Traffic
from bench.stats import percentile

log = logging.getLogger(__name__)

DATABASE = "dicomfleet"
# The catch-up run starts the sync on an empty database of its own.
CATCH_UP_DATABASE = "dicomfleet_catchup"
STOP_TIMEOUT_S = 60.0
# Today's practice lists every study this often.
POLL_PERIOD_S = 30.0


def sync_command(config: Path) -> list[str]:
    """Return the command line that starts the sync on CONFIG, as the deployed unit does."""
    return [sys.executable, "-m", "dicomfleet", "sync", "--config", str(config), "--log-level", "INFO"]


class SyncSite:
    """Orthanc, SecantusDB and the sync's configuration, all on loopback ports under FOLDER.

    The sync reaches Orthanc and SecantusDB through counting proxies for its whole
    life, so its idle traffic is measured without a restart (a restart reconciles).
    """

    def __init__(self, folder: Path, machines: list[dict]):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.mongo = localservers.SecantusProcess(folder / "secantus")
        central = {"dicomfleet_mongodb_uri": self.mongo.uri}
        self.archive = BenchArchive(folder / "orthanc", machines, central=central)
        self.process: subprocess.Popen | None = None
        self.log_path = folder / "sync.log"
        self.client: pymongo.MongoClient | None = None
        self.orthanc_proxy: CountingProxy | None = None
        self.mongodb_proxy: CountingProxy | None = None
        self.database = DATABASE

    def start(self) -> "SyncSite":
        """Start Orthanc, SecantusDB and the counting proxies in front of them."""
        self.archive.start()
        self.mongo.start()
        self.client = pymongo.MongoClient(self.mongo.uri, serverSelectionTimeoutMS=10000)
        self.orthanc_proxy = CountingProxy(("127.0.0.1", self.archive.orthanc.server.http_port),
                                           HTTPRequestCounter).start()
        self.mongodb_proxy = CountingProxy(("127.0.0.1", self.mongo.port), MongoMessageCounter).start()
        return self

    def stop(self) -> None:
        """Stop the sync, the proxies, SecantusDB and Orthanc."""
        self.stop_sync()
        for proxy in (self.orthanc_proxy, self.mongodb_proxy):
            if proxy is not None:
                proxy.close()
        if self.client is not None:
            self.client.close()
        self.mongo.stop()
        self.archive.stop()

    @property
    def proxied_orthanc_url(self) -> str:
        """Orthanc's URL through its counting proxy."""
        return f"http://127.0.0.1:{self.orthanc_proxy.port}"

    @property
    def proxied_mongodb_uri(self) -> str:
        """SecantusDB's URI through its counting proxy.

        directConnection keeps pymongo on the proxy: SecantusDB reports itself as
        a replica set member, and pymongo would otherwise connect to the address it advertises.
        """
        return f"mongodb://127.0.0.1:{self.mongodb_proxy.port}/?directConnection=true"

    def reset_traffic(self) -> None:
        """Zero both proxies' counters."""
        self.orthanc_proxy.reset()
        self.mongodb_proxy.reset()

    @property
    def studies(self):
        """The ``studies`` collection."""
        return self.client[self.database]["studies"]

    def checkpoint_seq(self) -> int:
        """Return the sequence number in the sync's checkpoint, 0 without one."""
        document = self.client[self.database]["sync_checkpoints"].find_one({})
        return int(document.get("seq", 0)) if document else 0

    def write_config(self, counted: bool = True) -> Path:
        """Render sync.toml for a local run, with Orthanc and MongoDB reached through the counting proxies when COUNTED."""
        server = self.archive.orthanc.server
        secrets = self.archive.orthanc.secrets
        text = render.render_template("sync.toml.j2", render.server_context(self.archive.site, server, secrets))

        password_file = self.folder / "sync-secrets" / "orthanc-sync"
        password_file.parent.mkdir(exist_ok=True)
        password_file.write_text(secrets.orthanc_password(credentials.SYNC_USER) + "\n")
        password_file.chmod(0o600)

        lines = []
        for line in text.splitlines():
            if counted and line.startswith("url = "):
                line = f"url = {json.dumps(self.proxied_orthanc_url)}"
            if counted and line.startswith("uri = "):
                line = f"uri = {json.dumps(self.proxied_mongodb_uri)}"
            if line.startswith("database = "):
                line = f"database = {json.dumps(self.database)}"
            lines.append(line)
            if line.startswith("credential = "):
                lines.append(f"password_file = {json.dumps(str(password_file))}")
        path = self.folder / "sync.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_sync(self, counted: bool = True) -> subprocess.Popen:
        """Write the configuration and start the sync, logging into sync.log; COUNTED as in write_config."""
        config = self.write_config(counted)
        with open(self.log_path, "ab") as handle:
            self.process = subprocess.Popen(sync_command(config), stdout=handle, stderr=subprocess.STDOUT)
        log.info("Sync started with PID %d on %s.", self.process.pid, config)
        return self.process

    def stop_sync(self) -> None:
        """Stop the sync with SIGTERM (SIGKILL after STOP_TIMEOUT_S)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("The sync (PID %d) did not stop within %.0f s of SIGTERM; killing it.",
                      process.pid, STOP_TIMEOUT_S)
            process.kill()
            process.wait()

    @property
    def sync_running(self) -> bool:
        """True while the sync process runs."""
        return self.process is not None and self.process.poll() is None

    def wait_caught_up(self, timeout: float) -> bool:
        """Wait until the sync's checkpoint reaches the end of Orthanc's change feed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.sync_running:
            if self.checkpoint_seq() >= self.archive.last_change():
                return True
            time.sleep(0.5)
        return False


def upload_studies(archive: BenchArchive, count: int, workers: int = 4) -> list[str]:
    """Store COUNT one-instance CT studies in Orthanc as the REST client user; return their Orthanc study IDs."""
    writer = dataset.SeriesWriter("CT128", patient_prefix="SYNC")
    pending: queue.Queue[bytes] = queue.Queue(maxsize=64)
    study_ids: list[str] = []
    failures: list[str] = []
    auth = (REST_CLIENT, archive.password_of(REST_CLIENT))

    def work() -> None:
        session = requests.Session()
        session.auth = auth
        while True:
            data = pending.get()
            if data is None:
                break
            answer = session.post(archive.url + "/instances", data=data, timeout=60)
            if answer.status_code != 200:
                failures.append(f"HTTP {answer.status_code}")
                continue
            study_ids.append(answer.json()["ParentStudy"])
        session.close()

    threads = [threading.Thread(target=work, name=f"bench-upload-{n}") for n in range(workers)]
    for thread in threads:
        thread.start()
    for _ in range(count):
        (data, _identifiers), = writer.encode_series(1)
        pending.put(data)
    for _ in threads:
        pending.put(None)
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"Orthanc rejected {len(failures)} of {count} benchmark studies: {failures[:3]}")
    return study_ids


@dataclasses.dataclass
class StableLatency:
    """Delays from a StableStudy change seen in Orthanc's feed to the study's MongoDB record."""

    delays_s: list[float]
    studies: int
    missing: int
    stable_age_s: float

    @property
    def p50(self) -> float | None:
        """The median delay, or None when a record never appeared."""
        return None if self.missing else percentile(self.delays_s, 0.5)

    @property
    def p99(self) -> float | None:
        """The 99th percentile delay, or None when a record never appeared."""
        return None if self.missing else percentile(self.delays_s, 0.99)


def measure_stable_to_record(site: SyncSite, studies: int, spacing_s: float = 0.5,
                             poll_interval: float = 0.02, timeout: float = 120.0) -> StableLatency:
    """With the sync running and caught up, store STUDIES studies SPACING_S apart; time each record.

    The clock starts when a poller first reads the study's StableStudy change from
    /changes and stops when a pymongo poller first finds its record.
    """
    archive = site.archive
    stable_seen: dict[str, float] = {}
    record_seen: dict[str, float] = {}
    expected: set[str] = set()
    stop = threading.Event()
    since = archive.last_change()

    def watch_feed() -> None:
        nonlocal since
        while not stop.is_set():
            page = archive.changes(since)
            now = time.monotonic()
            for change in page["Changes"]:
                if change["ChangeType"] == "StableStudy":
                    stable_seen.setdefault(change["ID"], now)
            since = page["Last"]
            if page["Done"]:
                stop.wait(poll_interval)

    def watch_records() -> None:
        while not stop.is_set():
            waiting = [study for study in stable_seen if study not in record_seen]
            if waiting:
                found = site.studies.find({"orthancStudyId": {"$in": waiting}}, {"orthancStudyId": 1})
                now = time.monotonic()
                for record in found:
                    record_seen.setdefault(record["orthancStudyId"], now)
            stop.wait(poll_interval)

    threads = [threading.Thread(target=watch_feed, name="bench-stable-feed", daemon=True),
               threading.Thread(target=watch_records, name="bench-stable-records", daemon=True)]
    for thread in threads:
        thread.start()

    for _ in range(studies):
        expected.update(upload_studies(archive, 1, workers=1))
        time.sleep(spacing_s)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not expected <= set(record_seen):
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join()

    delays = [record_seen[study] - stable_seen[study] for study in expected
              if study in record_seen and study in stable_seen]
    stable_age = float(archive.orthanc.server.vars.get("dicomfleet_orthanc_stable_age", 60))
    return StableLatency(delays, studies, studies - len(delays), stable_age)


def load_live(site: SyncSite, studies: int, timeout: float) -> float:
    """Store STUDIES studies while the sync follows the feed; wait until it recorded them and reached the feed's end.

    Returns the seconds the upload took. Raises RuntimeError when the sync does not catch up within TIMEOUT.
    """
    expected = site.studies.count_documents({}) + studies
    started = time.monotonic()
    upload_studies(site.archive, studies)
    upload_seconds = time.monotonic() - started

    deadline = time.monotonic() + timeout
    while site.studies.count_documents({}) < expected:
        if time.monotonic() > deadline or not site.sync_running:
            raise RuntimeError(f"The sync recorded {site.studies.count_documents({})} of {expected} studies "
                               f"within {timeout:.0f} s (running: {site.sync_running}); see {site.log_path}.")
        time.sleep(1.0)
    if not site.wait_caught_up(max(1.0, deadline - time.monotonic())):
        raise RuntimeError(f"The sync did not reach the end of the change feed within {timeout:.0f} s; "
                           f"see {site.log_path}.")
    return upload_seconds


@dataclasses.dataclass
class CatchUp:
    """Seconds from the sync's start on an empty database until each of Orthanc's STUDIES studies has a record."""

    studies: int
    seconds: float | None

    @property
    def studies_per_s(self) -> float | None:
        """Studies recorded per second, or None when the sync did not finish."""
        if self.seconds is None or self.seconds <= 0:
            return None
        return self.studies / self.seconds


def measure_catch_up(site: SyncSite, timeout: float) -> CatchUp:
    """Start the sync on an empty database of its own and time it until every study in Orthanc has a record.

    This is the backlog a new sync meets on an existing archive. The sync talks
    to Orthanc and MongoDB directly, as deployed: the counting proxies serve
    the idle-cost figures only. It is stopped afterwards and the site points
    at the usual database again.
    """
    site.stop_sync()
    studies = int(site.archive.statistics()["CountStudies"])
    site.database = CATCH_UP_DATABASE
    site.client.drop_database(CATCH_UP_DATABASE)
    try:
        started = time.monotonic()
        site.start_sync(counted=False)
        deadline = started + timeout
        while time.monotonic() < deadline and site.sync_running:
            if site.studies.count_documents({}) >= studies:
                return CatchUp(studies, time.monotonic() - started)
            # Counting scans the whole collection in SecantusDB (about 90 ms at 10,000 records),
            # so a tighter poll would slow the very writes it times.
            time.sleep(1.0)
        log.error("The sync did not record %d studies within %.0f s (running: %s); see %s.", studies, timeout,
                  site.sync_running, site.log_path)
        return CatchUp(studies, None)
    finally:
        site.stop_sync()
        site.database = DATABASE


@dataclasses.dataclass
class IdleCost:
    """Bytes and requests of idle cycles on the wire, to Orthanc and to MongoDB together."""

    studies: int
    cycles: int
    orthanc: Traffic
    mongodb: Traffic

    @property
    def bytes_per_cycle(self) -> float | None:
        """Bytes per cycle in both directions, Orthanc and MongoDB together."""
        if not self.cycles:
            return None
        return (self.orthanc.total_bytes + self.mongodb.total_bytes) / self.cycles

    @property
    def requests_per_cycle(self) -> float | None:
        """HTTP requests plus MongoDB messages per cycle."""
        if not self.cycles:
            return None
        return (len(self.orthanc.requests) + len(self.mongodb.requests)) / self.cycles


def _is_change_poll(request_line: str) -> bool:
    return request_line.startswith("GET /changes")


def measure_sync_idle(site: SyncSite, studies: int, window_s: float) -> IdleCost | None:
    """Count the running, caught-up sync's traffic over WINDOW_S seconds; cycles are its /changes polls."""
    if not site.wait_caught_up(timeout=600.0):
        log.error("The sync did not reach the end of the change feed; no idle figure.")
        return None

    site.reset_traffic()
    time.sleep(window_s)
    orthanc_traffic = site.orthanc_proxy.traffic()
    mongodb_traffic = site.mongodb_proxy.traffic()
    cycles = sum(1 for line in orthanc_traffic.requests if _is_change_poll(line))
    return IdleCost(studies, cycles, orthanc_traffic, mongodb_traffic)


def poll_cycle(orthanc_url: str, auth: tuple[str, str], collection) -> tuple[int, int]:
    """Run one cycle of today's polling script; return (studies in Orthanc, studies missing in MongoDB).

    It lists every study with ``GET /studies?expand`` and reads every record's
    Orthanc study ID from MongoDB to compare the two lists.
    """
    answer = requests.get(orthanc_url + "/studies", params={"expand": ""}, auth=auth, timeout=300)
    answer.raise_for_status()
    in_orthanc = {study["ID"] for study in answer.json()}
    in_mongodb = {record["orthancStudyId"] for record in collection.find({}, {"orthancStudyId": 1, "_id": 0})}
    return len(in_orthanc), len(in_orthanc - in_mongodb)


def measure_poll_idle(site: SyncSite, studies: int) -> IdleCost:
    """Stop the sync, then run one idle cycle of today's polling script through the proxies; return its cost.

    The MongoDB client connects and completes its handshake before the counters
    are reset, so the figure is one cycle of an already running poller.
    """
    site.stop_sync()
    client = pymongo.MongoClient(site.proxied_mongodb_uri, serverSelectionTimeoutMS=10000)
    try:
        client.admin.command("ping")
        site.reset_traffic()
        listed, missing = poll_cycle(site.proxied_orthanc_url, site.archive.orthanc.admin_auth,
                                     client[DATABASE]["studies"])
        if missing:
            log.error("The polling baseline found %d of %d studies missing in MongoDB.", missing, listed)
        return IdleCost(studies, 1, site.orthanc_proxy.traffic(), site.mongodb_proxy.traffic())
    finally:
        client.close()
