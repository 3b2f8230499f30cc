"""Measure the dashboard's fleet page with a large site: 200 machines and 100,000 study records.

``measure_fleet_page()`` starts SecantusDB, Orthanc and the dashboard as real
processes on loopback ports. It fills MongoDB's ``studies`` as the sync writes
it and sends every machine's heartbeat through the heartbeat API. Then it times
logged-in GET /fleet requests one after another and returns the 95th percentile in ms.
Run it alone with ``python -m bench.dashboard``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import random
import re
import tempfile
import time
from pathlib import Path

import pymongo
import requests

from dicomfleet import credentials, localservers
from dicomfleet.dashboard import localrun
from dicomfleet.inventory import load_site

from bench.stats import percentile

log = logging.getLogger(__name__)

INSERT_BATCH = 5000


@dataclasses.dataclass
class FleetPageResult:
    """Latencies of the fleet page, in milliseconds, with the size of the site behind them.

    ``p95_ms`` measures the dashboard as deployed, which reads study counts that
    a background thread aggregates every few seconds. ``per_page_p95_ms``
    measures it with that aggregation run inside every page request instead.
    """

    machines: int
    studies: int
    studies_today: int
    requests: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    per_page_p50_ms: float
    per_page_p95_ms: float


def _machines(count: int, folder: Path) -> list[dict]:
    machines = []
    for number in range(1, count + 1):
        machine_id = f"m{number:03d}"
        machines.append({
            "name": machine_id,
            "ansible_host": "127.0.0.1",
            "dicomfleet_machine_id": machine_id,
            "dicomfleet_ae_title": f"MOD{number:03d}",
            "dicomfleet_modality": "CT",
            "dicomfleet_location": f"Building {number // 20 + 1}, room {number}",
            "dicomfleet_ingest": "agent",
            "dicomfleet_watch_folders": [str(folder / "export" / machine_id)],
            "dicomfleet_working_hours": "Mon-Fri 07:00-19:00",
        })
    return machines


def _seed_studies(database: pymongo.database.Database, machine_ids: list[str], count: int, days: int,
                  seed: int) -> int:
    """Insert COUNT study records spread evenly over the last DAYS days; return how many fall on today."""
    generator = random.Random(seed)
    now = datetime.datetime.now(datetime.timezone.utc)
    local_midnight = datetime.datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    today = 0
    batch = []
    for number in range(count):
        received = now - datetime.timedelta(seconds=generator.uniform(0, days * 86400))
        if received >= local_midnight:
            today += 1
        machine_id = machine_ids[number % len(machine_ids)]
        instances = generator.randint(1, 400)
        batch.append({
            "orthancName": "local",
            "studyInstanceUID": f"1.2.826.0.1.3680043.10.1234.{number}",
            "patientID": f"P{number:07d}",
            "patientName": f"PATIENT^{number}",
            "studyDate": received.strftime("%Y%m%d"),
            "studyDescription": "CT THORAX",
            "modality": "CT",
            "modalitiesInStudy": ["CT"],
            "seriesCount": 3,
            "instanceCount": instances,
            "sourceMachine": machine_id,
            "sourceMachines": [machine_id],
            "orthancStudyId": f"{number:08x}-00000000-00000000-00000000-00000000",
            "remoteOrthancUrl": "http://127.0.0.1:8042",
            "series": [{"seriesInstanceUID": f"1.2.3.{number}.{index}", "modality": "CT",
                        "instanceCount": instances // 3, "sourceMachine": machine_id} for index in range(3)],
            "firstReceivedAt": received,
            "lastReceivedAt": received,
            "createdAt": received,
            "updatedAt": received,
            "deleted": False,
        })
        if len(batch) == INSERT_BATCH:
            database["studies"].insert_many(batch)
            batch = []
    if batch:
        database["studies"].insert_many(batch)
    return today


def _login(url: str, user: str, password: str) -> requests.Session:
    session = requests.Session()
    page = session.get(url + "/login", timeout=30)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    answer = session.post(url + "/login", data={"csrf": csrf, "user": user, "password": password}, timeout=30)
    answer.raise_for_status()
    return session


def _wait_for_log(dashboard: localrun.DashboardProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in dashboard.log_text():
        if time.monotonic() > deadline:
            raise RuntimeError(f"The dashboard did not log {text!r} within {timeout:.0f} s; see {dashboard.log_path}")
        time.sleep(0.5)


def _time_pages(dashboard: localrun.DashboardProcess, orthanc: localservers.OrthancProcess,
                count: int) -> list[float]:
    """Log in, load the fleet page five times to warm up, then return COUNT timed loads in ms."""
    login = credentials.DEFAULT_DASHBOARD_LOGIN
    session = _login(dashboard.url, login, orthanc.secrets.dashboard_password(login))
    for _ in range(5):
        session.get(dashboard.url + "/fleet", timeout=60).raise_for_status()

    latencies = []
    for _ in range(count):
        before = time.perf_counter()
        answer = session.get(dashboard.url + "/fleet", timeout=60)
        latencies.append((time.perf_counter() - before) * 1000.0)
        answer.raise_for_status()
    session.close()
    return latencies


def measure_fleet_page(machines: int = 200, studies: int = 100_000, days: int = 100, requests_count: int = 100,
                       folder: Path | None = None, seed: int = 1) -> FleetPageResult:
    """Time REQUESTS_COUNT fleet pages of a site with MACHINES machines and STUDIES records over DAYS days.

    Each machine has sent one heartbeat; the study records' reception times
    are spread evenly, so about STUDIES / DAYS fall on today. Returns the
    latencies, measured by a client on the same machine.
    """
    scratch = None
    if folder is None:
        scratch = tempfile.TemporaryDirectory(prefix="dicomfleet-bench-dashboard-")
        folder = Path(scratch.name)

    mongo = localservers.SecantusProcess(folder / "secantus")
    inventory = localservers.write_local_inventory(folder, _machines(machines, folder),
                                                   central={"dicomfleet_mongodb_uri": mongo.uri},
                                                   site_vars={"dicomfleet_site": "bench"})
    site = load_site(inventory)
    orthanc = localservers.OrthancProcess(site, folder, folder / "secrets" / "bench")
    dashboard = None
    try:
        mongo.start()
        orthanc.start()
        client = pymongo.MongoClient(mongo.uri, tz_aware=True)
        started = time.monotonic()
        today = _seed_studies(client["dicomfleet"], sorted(site.machines), studies, days, seed)
        log.info("Inserted %d study records (%d today) in %.0f s.", studies, today, time.monotonic() - started)

        port = localservers.free_port()
        config = localrun.write_dashboard_config(site, folder, orthanc.secrets, mongo.uri, port=port)
        dashboard = localrun.DashboardProcess(config, folder / "dashboard.log", port)
        dashboard.start(timeout=120)
        for machine_id in sorted(site.machines):
            answer = requests.post(f"{dashboard.url}/api/v1/heartbeats/{machine_id}", timeout=60,
                                   headers={"Authorization": f"Bearer {orthanc.secrets.heartbeat_token(machine_id)}"},
                                   json={"state": "sending", "agent_version": "bench", "files_queued": 0,
                                         "files_sent_today": 10, "files_failed": 0, "files_quarantined": 0})
            answer.raise_for_status()
        _wait_for_log(dashboard, "Scanned the last study", 900)
        deployed = _time_pages(dashboard, orthanc, requests_count)

        # The same site with the aggregation run inside each page request.
        dashboard.stop()
        config = localrun.write_dashboard_config(site, folder, orthanc.secrets, mongo.uri, port=port,
                                                 settings={"activity_refresh_s": 0})
        dashboard = localrun.DashboardProcess(config, folder / "dashboard-per-page.log", port)
        dashboard.start(timeout=120)
        _wait_for_log(dashboard, "Scanned the last study", 900)
        per_page = _time_pages(dashboard, orthanc, requests_count)
        client.close()

        return FleetPageResult(machines=machines, studies=studies, studies_today=today, requests=requests_count,
                               p50_ms=percentile(deployed, 0.5), p95_ms=percentile(deployed, 0.95),
                               max_ms=max(deployed), per_page_p50_ms=percentile(per_page, 0.5),
                               per_page_p95_ms=percentile(per_page, 0.95))
    finally:
        if dashboard is not None:
            dashboard.stop()
        orthanc.stop()
        mongo.stop()
        if scratch is not None:
            scratch.cleanup()


def fleet_page_p95_ms(**options) -> float:
    """Return the fleet page's 95th percentile latency in ms (see measure_fleet_page for OPTIONS)."""
    return measure_fleet_page(**options).p95_ms


def main(args: list[str] | None = None) -> int:
    """Print the fleet page's latencies; exit 1 when the 95th percentile is above --budget-ms."""
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=200, help="machines in the inventory (default 200)")
    parser.add_argument("--studies", type=int, default=100_000, help="study records in MongoDB (default 100000)")
    parser.add_argument("--days", type=int, default=100, help="days the records' reception spans (default 100)")
    parser.add_argument("--requests", type=int, default=100, help="timed page loads (default 100)")
    parser.add_argument("--budget-ms", type=float, default=300.0, help="the 95th percentile allowed (default 300)")
    options = parser.parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    result = measure_fleet_page(options.machines, options.studies, options.days, options.requests)
    print(f"Fleet page, {result.machines} machines, {result.studies} studies ({result.studies_today} today), "
          f"{result.requests} requests: p50 {result.p50_ms:.0f} ms, p95 {result.p95_ms:.0f} ms, "
          f"max {result.max_ms:.0f} ms (budget p95 {options.budget_ms:.0f} ms).")
    print(f"With the study counts aggregated inside each request: p50 {result.per_page_p50_ms:.0f} ms, "
          f"p95 {result.per_page_p95_ms:.0f} ms.")
    return 0 if result.p95_ms <= options.budget_ms else 1


if __name__ == "__main__":
    raise SystemExit(main())
