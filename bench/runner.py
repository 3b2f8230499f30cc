"""Run the benchmark groups in order and collect their figures into one Results.

The groups are sending (every client and the agent on the same files), agent, sync, fleet,
dashboard and deploy.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import statistics
import time
from pathlib import Path

from bench import agent_bench, dashboard, dataset, deploy_bench, dicom_clients, fleet, rest_clients, sync_bench
from bench.archive import CSTORE_MACHINE, BenchArchive, bench_machines
from bench.results import SPECS, Results
from bench.stats import TimedRun, median_rate

log = logging.getLogger(__name__)

GROUPS = ("sending", "agent", "sync", "fleet", "dashboard", "deploy")


@dataclasses.dataclass(frozen=True)
class Mode:
    """The size of each benchmark in the full run or the quick one."""

    name: str
    ct_files: int
    rounds: int
    latency_files: int
    latency_rate_per_s: float
    large_file_bytes: int
    stable_studies: int
    catchup_studies: int
    idle_window_s: float
    day: fleet.DayProfile
    page_studies: int
    page_requests: int
    deploy: bool


FULL = Mode(name="full", ct_files=300, rounds=3, latency_files=200, latency_rate_per_s=4.0,
            large_file_bytes=2_000_000_000, stable_studies=20, catchup_studies=10_000, idle_window_s=30.0,
            day=fleet.FULL_DAY, page_studies=100_000, page_requests=100, deploy=True)

QUICK = Mode(name="quick", ct_files=100, rounds=1, latency_files=30, latency_rate_per_s=5.0,
             large_file_bytes=200_000_000, stable_studies=5, catchup_studies=300, idle_window_s=10.0,
             day=fleet.QUICK_DAY, page_studies=5_000, page_requests=30, deploy=False)


class BenchRun:
    """One invocation of the harness: a work folder, a mode, the groups to run, and the results."""

    def __init__(self, mode: Mode, workdir: Path, groups: list[str]):
        self.mode = mode
        self.workdir = workdir
        self.groups = groups
        self.results = Results()
        self.group_seconds: dict[str, float] = {}
        self.failed_groups: list[str] = []

    def run(self) -> Results:
        """Run every selected group; a group that fails leaves its figures null and the next one runs."""
        steps = [("sending", self.run_sending), ("agent", self.run_agent), ("sync", self.run_sync),
                 ("fleet", self.run_fleet), ("dashboard", self.run_dashboard), ("deploy", self.run_deploy)]
        for name, step in steps:
            if name not in self.groups:
                continue
            started = time.monotonic()
            log.info("Benchmark group %s starts.", name)
            try:
                step()
            except Exception as error:
                log.exception("Benchmark group %s failed; its figures stay null.", name)
                self.failed_groups.append(name)
                self._fail_group(name, f"the {name} group failed: {type(error).__name__}: {error}")
            self.group_seconds[name] = round(time.monotonic() - started, 1)
            log.info("Benchmark group %s took %.0f s.", name, self.group_seconds[name])
        self.results.derive()
        return self.results

    def _fail_group(self, name: str, reason: str) -> None:
        sections = {"sending": ("rest", "dicom"), "agent": ("agent",), "sync": ("sync",),
                    "fleet": ("fleet",), "dashboard": ("dashboard",), "deploy": ("deploy",)}[name]
        keys = [key for key, spec in SPECS.items() if spec.section in sections and key not in self.results.figures]
        self.results.skip(keys, reason)

    # Sending the CT slices ---------------------------------------------------------------

    def run_sending(self) -> None:
        """Store the same CT slices with each raw client and the agent, emptying Orthanc between runs.

        The clients take turns in each round, so a slow spell of the machine hits them all.
        The agent takes part only when the agent group is selected too.
        """
        with_agent = "agent" in self.groups
        folder = self.workdir / "sending"
        slices = folder / "ct"
        log.info("Writing %d CT slices into %s.", self.mode.ct_files, slices)
        files = [written.path for written in dataset.write_ct_slices(slices, self.mode.ct_files)]
        for path in files:
            path.read_bytes()

        archive = BenchArchive(folder / "central", bench_machines(folder / "agent-export")).start()
        runs: dict[str, list[TimedRun]] = {}
        firsts: list[float] = []
        after_first: list[float] = []
        try:
            bench = agent_bench.AgentBench(archive, folder / "agent")
            for round_number in range(1, self.mode.rounds + 1):
                log.info("Sending round %d of %d.", round_number, self.mode.rounds)
                for key, client in self._rest_clients(archive, slices, files):
                    archive.reset()
                    runs.setdefault(key, []).append(client())
                if with_agent:
                    archive.reset()
                    run, first = agent_bench.measure_backlog(bench, files)
                    runs.setdefault("agent_backlog_files_per_s", []).append(run)
                    if first is not None and run.complete and run.seconds > first:
                        firsts.append(first)
                        after_first.append((run.files - 1) / (run.seconds - first))

            for key, client in self._dicom_clients(archive, files):
                archive.reset()
                runs[key] = [client()]
            if with_agent:
                archive.reset()
                cstore = agent_bench.AgentBench(archive, folder / "agent-cstore", CSTORE_MACHINE)
                runs["cstore_files_per_s"] = [agent_bench.measure_backlog(cstore, files)[0]]
        finally:
            archive.stop()

        for key, timed in runs.items():
            self._set_rate(key, timed)
        if with_agent:
            self.results.set("agent_backlog_seconds_to_first", statistics.median(firsts) if firsts else None,
                             runs["agent_backlog_files_per_s"][0].command,
                             "median over the rounds" if firsts else "the agent did not store its backlog",
                             samples=[round(value, 3) for value in firsts])
            self.results.set("agent_backlog_after_first_files_per_s",
                             statistics.median(after_first) if after_first else None,
                             runs["agent_backlog_files_per_s"][0].command,
                             "median over the rounds of (files - 1) / (seconds - seconds to the first file)"
                             if after_first else "the agent did not store its backlog",
                             samples=[round(value, 2) for value in after_first])
        shutil.rmtree(folder, ignore_errors=True)

    def _rest_clients(self, archive: BenchArchive, slices: Path, files: list[Path]):
        return [
            ("curl_loop_files_per_s", lambda: rest_clients.curl_loop(archive, slices, files)),
            ("xargs_curl_files_per_s", lambda: rest_clients.xargs_curl(archive, slices, files)),
            ("keepalive_sequential_files_per_s", lambda: rest_clients.keepalive_sequential(archive, files)),
            ("keepalive_4_workers_files_per_s", lambda: rest_clients.keepalive_workers(archive, files)),
        ]

    def _dicom_clients(self, archive: BenchArchive, files: list[Path]):
        return [
            ("storescu_files_per_s", lambda: dicom_clients.storescu(archive, files)),
            ("dcmsend_files_per_s", lambda: dicom_clients.dcmsend(archive, files)),
            ("pynetdicom_1assoc_files_per_s", lambda: dicom_clients.pynetdicom_store(archive, files)),
            ("pynetdicom_1assoc_nodelay_files_per_s",
             lambda: dicom_clients.pynetdicom_store(archive, files, nodelay=True)),
            ("pynetdicom_4assoc_files_per_s", lambda: dicom_clients.pynetdicom_store(archive, files, associations=4)),
            ("pynetdicom_1assoc_quickack_files_per_s",
             lambda: dicom_clients.pynetdicom_store(archive, files, nodelay=True, quickack=True)),
        ]

    def _set_rate(self, key: str, runs: list[TimedRun]) -> None:
        rate = median_rate(runs)
        seconds = [round(run.seconds, 3) for run in runs]
        notes = "; ".join(run.note for run in runs if run.note)
        summary = f"{runs[0].files} files; seconds per run: {seconds}"
        if len(runs) > 1:
            summary += "; the median run's rate"
        if rate is None:
            self.results.set(key, None, runs[0].command, f"a run did not store every file: {notes or summary}")
            return
        self.results.set(key, rate, runs[0].command, summary, samples=seconds)

    # The agent alone ------------------------------------------------------------------------

    def run_agent(self) -> None:
        """Measure the agent's latency and its memory while it sends a large file."""
        folder = self.workdir / "agent"
        archive = BenchArchive(folder / "central", bench_machines(folder / "agent-export")).start()
        try:
            bench = agent_bench.AgentBench(archive, folder / "agent")
            command = " ".join(agent_bench.agent_command(bench.config))
            latency = agent_bench.measure_latency(bench, self.mode.latency_files, self.mode.latency_rate_per_s)
            note = (f"{latency.files} CT slices of 512 KiB written one by one at {latency.rate_per_s:g}/s; "
                    f"change feed polled every {latency.poll_interval_s * 1000:.0f} ms; "
                    f"{latency.missing} never arrived")
            self.results.set("agent_latency_p50_s", latency.p50, command, note,
                             samples=[round(value, 4) for value in latency.latencies_s])
            self.results.set("agent_latency_p99_s", latency.p99, command, note)

            archive.reset()
            memory = agent_bench.measure_large_file_memory(bench, folder / "large", self.mode.large_file_bytes)
            stored = "stored" if memory.stored else "NOT stored"
            note = f"one multi-frame CT of {memory.file_bytes} bytes, {stored} in {memory.seconds:.0f} s"
            peak = memory.peak_kib / 1024 if memory.stored and memory.peak_kib else None
            self.results.set("agent_peak_rss_mb_large_file", peak, command, note if peak else "not " + note)
            self.results.set("agent_large_file_mb", memory.file_bytes / 1_000_000, note=note)
            self.results.set("agent_large_file_seconds", memory.seconds if memory.stored else None, command, note)
            idle = memory.idle_peak_kib / 1024 if memory.idle_peak_kib else None
            self.results.set("agent_idle_rss_mb", idle, command, "VmHWM after the agent stored one 512 KiB file")
        finally:
            archive.stop()
        shutil.rmtree(folder, ignore_errors=True)

    # The sync -------------------------------------------------------------------------------

    def run_sync(self) -> None:
        """Measure the sync's stable-to-record delay, its catch-up rate and its idle cost against polling."""
        folder = self.workdir / "sync"
        site = sync_bench.SyncSite(folder, bench_machines(folder / "agent-export")).start()
        command = " ".join(sync_bench.sync_command(folder / "sync.toml"))
        try:
            site.start_sync()
            site.wait_caught_up(timeout=60.0)
            latency = sync_bench.measure_stable_to_record(site, self.mode.stable_studies)
            note = (f"{latency.studies} one-instance studies stored 0.5 s apart, StableAge {latency.stable_age_s:g} s; "
                    f"the sync polls /changes about once a second; {latency.missing} records never appeared")
            self.results.set("sync_stable_to_record_p50_s", latency.p50, command, note,
                             samples=[round(value, 3) for value in latency.delays_s])
            self.results.set("sync_stable_to_record_p99_s", latency.p99, command, note)

            upload_seconds = sync_bench.load_live(site, self.mode.catchup_studies,
                                                  timeout=max(600.0, self.mode.catchup_studies * 0.2))
            self.results.set("sync_live_upload_s", upload_seconds, command,
                             f"{self.mode.catchup_studies} one-instance CT studies from 4 keep-alive REST workers")

            studies = site.studies.count_documents({})
            self.results.set("idle_cycle_studies", studies, note="studies in Orthanc and MongoDB")
            idle = sync_bench.measure_sync_idle(site, studies, self.mode.idle_window_s)
            if idle is None:
                self.results.skip(["sync_idle_cycle_bytes", "sync_idle_cycle_requests"],
                                  "the sync did not settle at the end of the change feed")
            else:
                note = (f"{idle.cycles} polls in {self.mode.idle_window_s:g} s: Orthanc {idle.orthanc.total_bytes} "
                        f"bytes in {len(idle.orthanc.requests)} requests, MongoDB {idle.mongodb.total_bytes} bytes "
                        f"in {len(idle.mongodb.requests)} messages")
                self.results.set("sync_idle_cycle_bytes", idle.bytes_per_cycle, command, note)
                self.results.set("sync_idle_cycle_requests", idle.requests_per_cycle, command, note)

            poll = sync_bench.measure_poll_idle(site, studies)
            poll_command = ("python: requests.get(ORTHANC/studies?expand) and "
                            "pymongo studies.find({}, {orthancStudyId: 1}), compared as sets")
            note = (f"Orthanc {poll.orthanc.total_bytes} bytes in {len(poll.orthanc.requests)} requests, MongoDB "
                    f"{poll.mongodb.total_bytes} bytes in {len(poll.mongodb.requests)} messages; "
                    f"today's poller runs this every {sync_bench.POLL_PERIOD_S:g} s")
            self.results.set("poll_idle_cycle_bytes", poll.bytes_per_cycle, poll_command, note)
            self.results.set("poll_idle_cycle_requests", poll.requests_per_cycle, poll_command, note)

            catch_up = sync_bench.measure_catch_up(site, timeout=max(600.0, self.mode.catchup_studies * 0.2))
            note = (f"the sync started on an empty MongoDB database while Orthanc held {catch_up.studies} studies, "
                    "talking to both directly as deployed; timed until every record existed")
            self.results.set("sync_catchup_studies", catch_up.studies, command, note)
            self.results.set("sync_catchup_studies_per_s", catch_up.studies_per_s, command, note)
        finally:
            site.stop()
        shutil.rmtree(folder, ignore_errors=True)

    # The fleet ------------------------------------------------------------------------------

    def run_fleet(self) -> None:
        """Run one agent process per simulated machine with the sync, and count every file."""
        day = self.mode.day
        result = fleet.run_fleet(self.workdir / "fleet", day, with_sync=True)
        command = (f"{result.agent_processes} x 'python -m dicomfleet agent --config agent-NNN/agent.toml', "
                   "one 'python -m dicomfleet sync', one Orthanc, one SecantusDB")
        profile = ", ".join(f"{day.machines[kind]} {kind} machines x {day.studies[kind]} studies x "
                            f"{day.images[kind]} images" for kind in day.machines)
        note = f"{profile}; studies land over {day.window_s:g} s"
        if result.machines_per_process > 1:
            note += (f"; {result.machines_per_process} machines ([[machine]] entries) per agent process, because "
                     "the free inotify instances (fs.inotify.max_user_instances) did not allow one process each")
        for extra in result.notes:
            note += f"; {extra}"
        values = {
            "fleet_machines": result.machines,
            "fleet_agent_processes": result.agent_processes,
            "fleet_machines_per_process": result.machines_per_process,
            "fleet_agent_restarts": result.agent_restarts,
            "fleet_files_dropped": result.files_dropped,
            "fleet_mb_dropped": round(result.bytes_dropped / 1_000_000, 1),
            "fleet_files_sent": result.files_sent,
            "fleet_files_stored": result.files_stored,
            "fleet_files_recorded": result.files_recorded,
            "fleet_files_lost": result.files_lost,
            "fleet_studies_wrong_source": result.studies_wrong_source,
            "fleet_seconds_to_stored": result.seconds_to_stored,
            "fleet_seconds_to_recorded": result.seconds_to_recorded,
            "fleet_agents_start_s": result.start_seconds,
        }
        for key, value in values.items():
            detail = note
            if key == "fleet_files_lost" and result.per_machine_lost:
                detail += f"; missing per machine: {result.per_machine_lost}"
            self.results.set(key, value, command, detail if value is not None else "not measured: " + detail)

    # The dashboard --------------------------------------------------------------------------

    def run_dashboard(self) -> None:
        """Measure the fleet page's response time with the dashboard's own measurement, bench.dashboard."""
        folder = self.workdir / "dashboard"
        folder.mkdir(parents=True, exist_ok=True)
        page = dashboard.measure_fleet_page(machines=200, studies=self.mode.page_studies,
                                            requests_count=self.mode.page_requests, folder=folder)
        command = (f"python -m bench.dashboard --machines {page.machines} --studies {page.studies} "
                   f"--requests {page.requests}")
        note = (f"{page.requests} logged-in GET /fleet one after another, {page.machines} machines with a "
                f"heartbeat each, {page.studies} study records ({page.studies_today} today); "
                f"slowest {page.max_ms:.0f} ms")
        self.results.set("fleet_page_machines", page.machines, command, note)
        self.results.set("fleet_page_studies", page.studies, command, note)
        self.results.set("fleet_page_p50_ms", page.p50_ms, command, note)
        self.results.set("fleet_page_p95_ms", page.p95_ms, command, note)
        shutil.rmtree(folder, ignore_errors=True)

    # Deploys --------------------------------------------------------------------------------

    def run_deploy(self) -> None:
        """Time the pyinfra deploy cold and rerun on fresh lab hosts, then Ansible's rerun."""
        if not self.mode.deploy:
            self._fail_group("deploy", "deploys are not measured in --quick mode (a cold deploy alone takes minutes)")
            return
        result = deploy_bench.measure_deploys(self.workdir / "deploy")
        inventory = self.workdir / "deploy" / "bench-lab.yml"
        note = f"{result.hosts} lab hosts on 127.0.10.180-183; " + "; ".join(result.notes)
        command = f"dicomfleet deploy {inventory}"
        self.results.set("deploy_lab_boot_s", result.boot_s, f"dicomfleet lab up --fresh {inventory}", note)
        self.results.set("deploy_lab_cold_s", result.cold_s, command, note)
        self.results.set("deploy_lab_rerun_s", result.rerun_s, command, note)
        self.results.set("deploy_rerun_changes", result.rerun_changes, command, note)
        ansible = " ".join(deploy_bench.ansible_playbook_command(inventory) or ["ansible-playbook (missing)"])
        self.results.set("ansible_rerun_changes", result.ansible_rerun_changes, ansible, note)
        if result.ansible_rerun_changes:
            # A rerun that still changes tasks is not comparable with pyinfra's no-change rerun.
            self.results.set("ansible_lab_rerun_s", None, ansible,
                             f"Ansible's rerun changed {result.ansible_rerun_changes} tasks in "
                             f"{result.ansible_rerun_s:.0f} s, so it is not a no-change rerun; {note}")
        else:
            self.results.set("ansible_lab_rerun_s", result.ansible_rerun_s, ansible, note)
