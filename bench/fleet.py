"""Run a fleet of real agent processes against one Orthanc and the sync, and count every file.

Each simulated machine is an agent process with its own folder, spool, user and AE title.
A compressed day of CT, MR and radiography studies lands on a random schedule.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path

from dicomfleet import localservers

from bench import dataset
from bench.agent_bench import AgentProcess
from bench.sync_bench import SyncSite

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DayProfile:
    """The studies each kind of machine exports in one compressed day."""

    # kind -> number of machines of that kind
    machines: dict[str, int]
    # kind -> studies per machine
    studies: dict[str, int]
    # kind -> series per study
    series: dict[str, int]
    # kind -> images per study
    images: dict[str, int]
    # seconds over which the studies land in the folders
    window_s: float

    @property
    def machine_count(self) -> int:
        """Machines in the fleet."""
        return sum(self.machines.values())

    def files_of(self, kind: str) -> int:
        """Files one machine of KIND exports."""
        return self.studies[kind] * self.images[kind]

    @property
    def file_count(self) -> int:
        """Files the whole fleet exports."""
        return sum(self.machines[kind] * self.files_of(kind) for kind in self.machines)


# A busy site's day, compressed: a CT exports thin-slice series of 512 KiB slices,
# an MR several series of 128 KiB slices, an X-ray room a few 6 MiB radiographs per study.
FULL_DAY = DayProfile(
    machines={"CT": 50, "MR": 50, "CR": 100},
    studies={"CT": 2, "MR": 2, "CR": 2},
    series={"CT": 1, "MR": 2, "CR": 1},
    images={"CT": 40, "MR": 40, "CR": 2},
    window_s=60.0,
)

QUICK_DAY = DayProfile(
    machines={"CT": 5, "MR": 5, "CR": 10},
    studies={"CT": 1, "MR": 1, "CR": 2},
    series={"CT": 1, "MR": 2, "CR": 1},
    images={"CT": 20, "MR": 20, "CR": 2},
    window_s=15.0,
)


def machine_ids(profile: DayProfile) -> list[tuple[str, str]]:
    """Return (machine id, image kind) for every machine of PROFILE, for example ("ct007", "CT")."""
    machines = []
    for kind, count in profile.machines.items():
        for number in range(1, count + 1):
            machines.append((f"{kind.lower()}{number:03d}", kind))
    return machines


def fleet_machines(profile: DayProfile, folder: Path) -> list[dict]:
    """Return the inventory machines of PROFILE, each watching FOLDER/MACHINE/export."""
    machines = []
    for machine_id, kind in machine_ids(profile):
        machines.append({
            "name": machine_id,
            "ansible_host": "127.0.0.1",
            "dicomfleet_machine_id": machine_id,
            "dicomfleet_ae_title": machine_id.upper(),
            "dicomfleet_modality": kind,
            "dicomfleet_location": f"Benchmark fleet, {kind} room {machine_id[-3:]}",
            "dicomfleet_ingest": "agent",
            "dicomfleet_watch_folders": [str(folder / machine_id / "export")],
        })
    return machines


@dataclasses.dataclass
class Study:
    """One study staged for a machine: its files wait in STAGING until it lands at RELEASE_AT."""

    machine: str
    study_uid: str
    staging: Path
    files: list[Path]
    release_at: float


def stage_day(profile: DayProfile, staging: Path, seed: int = 1) -> list[Study]:
    """Write every study of PROFILE's day under STAGING and give each a landing time in the window."""
    writers = {kind: dataset.SeriesWriter(kind, patient_prefix=f"FLEET{kind}") for kind in profile.machines}
    schedule = random.Random(seed)
    studies = []
    for machine_id, kind in machine_ids(profile):
        for _ in range(profile.studies[kind]):
            encoded = writers[kind].encode_series(profile.images[kind], profile.series[kind])
            study_uid = encoded[0][1].study_uid
            folder = staging / machine_id / study_uid
            folder.mkdir(parents=True)
            paths = []
            for data, identifiers in encoded:
                path = folder / f"{identifiers.sop_uid}.dcm"
                path.write_bytes(data)
                paths.append(path)
            studies.append(Study(machine_id, study_uid, folder, paths,
                                 schedule.uniform(0.0, profile.window_s)))
    studies.sort(key=lambda study: study.release_at)
    return studies


def release(study: Study, watch: Path) -> None:
    """Move STUDY's files into a new subfolder of WATCH, one rename per file, as an export does."""
    target = watch / study.study_uid
    target.mkdir()
    for path in study.files:
        os.rename(path, target / path.name)


@dataclasses.dataclass
class FleetResult:
    """The count of the fleet's files at each step: dropped, sent, stored and recorded."""

    machines: int
    agent_processes: int
    machines_per_process: int
    agent_restarts: int
    files_dropped: int
    bytes_dropped: int
    files_sent: int | None
    files_stored: int
    files_recorded: int | None
    studies_expected: int
    studies_recorded: int | None
    studies_wrong_source: int | None
    seconds_to_stored: float | None
    seconds_to_recorded: float | None
    start_seconds: float
    per_machine_lost: dict[str, int]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def files_lost(self) -> int:
        """Files dropped that are missing in Orthanc or, when the sync ran, in MongoDB's counts."""
        arrived = self.files_stored
        if self.files_recorded is not None:
            arrived = min(arrived, self.files_recorded)
        return max(0, self.files_dropped - arrived)


def read_sent_count(status_file: Path) -> int | None:
    """Return the files sent today over all machines of one agent's status file, or None when unreadable."""
    try:
        document = json.loads(status_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return sum(int(machine.get("files_sent_today", 0)) for machine in document.get("machines", {}).values())


# Agents started at once; each batch writes its status files before the next starts,
# so 200 interpreters do not all import at the same moment.
START_BATCH = 10
# inotify instances left free for the rest of the machine (systemd, lab hosts, tests).
INOTIFY_RESERVE = 100


def free_inotify_instances() -> int | None:
    """Return how many more inotify instances this user may open, or None when /proc cannot tell.

    Each agent process opens one; Linux limits them per user (fs.inotify.max_user_instances).
    """
    try:
        limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    except (OSError, ValueError):
        return None

    used = 0
    uid = os.getuid()
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            if process.stat().st_uid != uid:
                continue
            for descriptor in (process / "fd").iterdir():
                if os.readlink(descriptor) == "anon_inode:inotify":
                    used += 1
        except OSError:
            continue
    return limit - used


def machines_per_process(machines: int, free_instances: int | None, reserve: int = INOTIFY_RESERVE) -> int:
    """Return how many machines each agent process serves so that the processes fit the free inotify instances."""
    if free_instances is None:
        return 1
    processes = max(1, min(machines, free_instances - reserve))
    return -(-machines // processes)


def write_group_config(site, hosts: list[str], folder: Path, secrets) -> Path:
    """Write one agent configuration serving the machines of HOSTS, with its state under FOLDER."""
    texts = [localservers.write_agent_config(site, host, folder, secrets).read_text(encoding="utf-8")
             for host in hosts]
    head = texts[0].split("\n[[machine]]", 1)[0]
    blocks = ["[[machine]]" + text.split("\n[[machine]]", 1)[1] for text in texts]
    path = folder / "agent.toml"
    path.write_text(head.rstrip() + "\n\n" + "\n".join(block.strip() + "\n" for block in blocks), encoding="utf-8")
    return path


class Supervisor:
    """Restarts agent processes that exit, as the deployed unit does (Restart=always, RestartSec=5)."""

    def __init__(self, restart_after_s: float = 5.0):
        self.agents: list[AgentProcess] = []
        self.restart_after_s = restart_after_s
        self.exited_at: dict[int, float] = {}
        self.restarts = 0
        self.first_exit = ""

    def add(self, agent: AgentProcess) -> None:
        """Supervise AGENT, which is already started."""
        self.agents.append(agent)

    def check(self) -> None:
        """Restart every agent that has been down for RESTART_AFTER_S seconds."""
        now = time.monotonic()
        for number, agent in enumerate(self.agents):
            if agent.running:
                continue

            if number not in self.exited_at:
                self.exited_at[number] = now
                if not self.first_exit:
                    self.first_exit = (f"{agent.config} exited with status {agent.process.returncode}: "
                                       f"{agent.log_tail(300)}")
                log.warning("Agent %s exited with status %s; restarting it in %.0f s.", agent.config,
                            agent.process.returncode, self.restart_after_s)
                continue

            if now - self.exited_at[number] >= self.restart_after_s:
                del self.exited_at[number]
                self.restarts += 1
                agent.start()

    def stop_all(self) -> None:
        """Stop every agent: SIGTERM to all first, then wait for each."""
        for agent in self.agents:
            if agent.running:
                agent.process.send_signal(signal.SIGTERM)
        for agent in self.agents:
            agent.stop()


def _start_agents(site: SyncSite, groups: list[list[str]], folder: Path, supervisor: Supervisor) -> list[Path]:
    """Start one agent process per group of machine ids, START_BATCH at a time; return their status files."""
    status_files: list[Path] = []
    for first in range(0, len(groups), START_BATCH):
        batch_files = []
        for number, machine_group in enumerate(groups[first:first + START_BATCH], start=first + 1):
            for machine_id in machine_group:
                Path(site.archive.site.machines[machine_id].watch_folders[0]).mkdir(parents=True, exist_ok=True)
            agent_folder = folder / f"agent-{number:03d}"
            agent_folder.mkdir(parents=True, exist_ok=True)
            config = write_group_config(site.archive.site, machine_group, agent_folder, site.archive.orthanc.secrets)
            supervisor.add(AgentProcess(config, agent_folder / "agent.log").start())
            batch_files.append(agent_folder / "agent-state" / "status.json")
        _wait_for_files(batch_files, supervisor, timeout=300.0)
        status_files += batch_files
    return status_files


def run_fleet(folder: Path, profile: DayProfile, with_sync: bool, timeout: float = 1200.0) -> FleetResult:
    """Start the fleet's agent processes, land the day's studies, and count every file."""
    machines_folder = folder / "machines"
    site = SyncSite(folder / "central", fleet_machines(profile, machines_folder)).start()
    supervisor = Supervisor()
    try:
        log.info("Staging %d files for %d machines.", profile.file_count, profile.machine_count)
        studies = stage_day(profile, folder / "staging")
        bytes_dropped = sum(path.stat().st_size for study in studies for path in study.files)

        if with_sync:
            site.start_sync()

        free = free_inotify_instances()
        per_process = machines_per_process(profile.machine_count, free)
        ids = [machine_id for machine_id, _kind in machine_ids(profile)]
        groups = [ids[first:first + per_process] for first in range(0, len(ids), per_process)]
        log.info("%d free inotify instances: starting %d agent processes of %d machines each.",
                 free if free is not None else -1, len(groups), per_process)
        started = time.monotonic()
        status_files = _start_agents(site, groups, folder / "agents", supervisor)
        start_seconds = time.monotonic() - started
        log.info("%d agents started in %.0f s.", len(supervisor.agents), start_seconds)

        expected = len([path for study in studies for path in study.files])
        released_at = time.monotonic()
        for study in studies:
            time.sleep(max(0.0, released_at + study.release_at - time.monotonic()))
            supervisor.check()
            release(study, Path(site.archive.site.machines[study.machine].watch_folders[0]))
        log.info("All %d studies landed; waiting for Orthanc%s.", len(studies), " and MongoDB" if with_sync else "")

        stored_at = _wait_for_count(site.archive.count_instances, expected, supervisor, timeout)
        stored = site.archive.count_instances()
        recorded_at = None
        recorded = studies_recorded = wrong_source = None
        per_machine = {}
        if with_sync:
            recorded_at = _wait_for_count(lambda: _recorded_instances(site), expected, supervisor, timeout)
            recorded, studies_recorded, wrong_source, per_machine = _count_records(site, studies)

        # The status file is rewritten every few seconds; give it one more turn.
        time.sleep(6.0)
        sent_counts = [read_sent_count(path) for path in status_files]
        files_sent = None if any(count is None for count in sent_counts) else sum(sent_counts)
        notes = []
        if supervisor.first_exit:
            notes.append(f"agent processes exited and were restarted {supervisor.restarts} times, as systemd "
                         f"restarts the deployed unit; the first exit: {supervisor.first_exit}")

        return FleetResult(
            machines=profile.machine_count, agent_processes=len(supervisor.agents), machines_per_process=per_process,
            agent_restarts=supervisor.restarts,
            files_dropped=expected, bytes_dropped=bytes_dropped, files_sent=files_sent, files_stored=stored,
            files_recorded=recorded, studies_expected=len(studies), studies_recorded=studies_recorded,
            studies_wrong_source=wrong_source,
            seconds_to_stored=None if stored_at is None else stored_at - released_at,
            seconds_to_recorded=None if recorded_at is None else recorded_at - released_at,
            start_seconds=start_seconds, per_machine_lost=per_machine, notes=notes,
        )
    finally:
        supervisor.stop_all()
        site.stop()
        shutil.rmtree(machines_folder, ignore_errors=True)
        shutil.rmtree(folder / "agents", ignore_errors=True)
        shutil.rmtree(folder / "staging", ignore_errors=True)
        shutil.rmtree(folder / "central" / "orthanc" / "orthanc-storage", ignore_errors=True)


def _wait_for_files(paths, supervisor: Supervisor, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(paths)
    while pending and time.monotonic() < deadline:
        supervisor.check()
        pending = [path for path in pending if not path.exists()]
        time.sleep(0.5)
    if pending:
        log.error("%d agents wrote no status file within %.0f s, for example %s.", len(pending), timeout, pending[0])


def _wait_for_count(count, expected: int, supervisor: Supervisor, timeout: float) -> float | None:
    """Poll COUNT() until it reaches EXPECTED, restarting exited agents meanwhile; return the monotonic time or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if count() >= expected:
            return time.monotonic()
        supervisor.check()
        time.sleep(0.5)
    return None


def _recorded_instances(site: SyncSite) -> int:
    result = list(site.studies.aggregate([{"$group": {"_id": None, "total": {"$sum": "$instanceCount"}}}]))
    return int(result[0]["total"]) if result else 0


def _count_records(site: SyncSite, studies: list[Study]) -> tuple[int, int, int, dict[str, int]]:
    """Return recorded instances, studies recorded, studies with a wrong source, and files lost per machine."""
    records = {record["studyInstanceUID"]: record for record in
               site.studies.find({}, {"studyInstanceUID": 1, "instanceCount": 1, "sourceMachine": 1})}
    recorded_files = 0
    studies_recorded = 0
    wrong_source = 0
    lost: dict[str, int] = {}
    for study in studies:
        record = records.get(study.study_uid)
        count = int(record.get("instanceCount", 0)) if record else 0
        recorded_files += count
        if record:
            studies_recorded += 1
            if record.get("sourceMachine") != study.machine:
                wrong_source += 1
        missing = len(study.files) - count
        if missing > 0:
            lost[study.machine] = lost.get(study.machine, 0) + missing
    return recorded_files, studies_recorded, wrong_source, lost
