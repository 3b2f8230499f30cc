"""The figures ``make bench`` reports: their keys, units and meanings, and the JSON document that contains them.

Every key is in bench/results/latest.json: a number measured in this run, or null with
the reason under ``not_measured``. Nothing is carried over from an earlier run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from bench.stats import ratio

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    """The unit, section and meaning of one key of latest.json."""

    key: str
    unit: str
    section: str
    description: str


SECTION_REST = "rest"
SECTION_DICOM = "dicom"
SECTION_AGENT = "agent"
SECTION_SYNC = "sync"
SECTION_FLEET = "fleet"
SECTION_DASHBOARD = "dashboard"
SECTION_DEPLOY = "deploy"

_SPECS = [
    # Sending the CT slices over REST.
    FigureSpec("curl_loop_files_per_s", "files/s", SECTION_REST, "one curl process per file, in sequence (today's watcher)"),
    FigureSpec("xargs_curl_files_per_s", "files/s", SECTION_REST, "xargs -P4 curl"),
    FigureSpec("keepalive_sequential_files_per_s", "files/s", SECTION_REST, "one keep-alive requests session, sequential"),
    FigureSpec("keepalive_4_workers_files_per_s", "files/s", SECTION_REST, "four keep-alive requests sessions in threads"),
    FigureSpec("best_rest_client_files_per_s", "files/s", SECTION_REST, "the fastest of the four raw REST clients above"),
    FigureSpec("agent_backlog_files_per_s", "files/s", SECTION_REST,
               "the agent on a folder holding the backlog, from process start until /statistics shows every file"),
    FigureSpec("ratio_agent_vs_best_rest", "ratio", SECTION_REST, "agent backlog rate / best raw REST client rate"),
    FigureSpec("ratio_agent_vs_curl_loop", "ratio", SECTION_REST, "agent backlog rate / curl loop rate"),
    # Sending the CT slices over DICOM.
    FigureSpec("storescu_files_per_s", "files/s", SECTION_DICOM, "DCMTK storescu, one association"),
    FigureSpec("dcmsend_files_per_s", "files/s", SECTION_DICOM, "DCMTK dcmsend, one association"),
    FigureSpec("pynetdicom_1assoc_files_per_s", "files/s", SECTION_DICOM, "pynetdicom, one association, defaults"),
    FigureSpec("pynetdicom_1assoc_nodelay_files_per_s", "files/s", SECTION_DICOM,
               "pynetdicom, one association, TCP_NODELAY"),
    FigureSpec("pynetdicom_4assoc_files_per_s", "files/s", SECTION_DICOM, "pynetdicom, four associations, defaults"),
    FigureSpec("pynetdicom_1assoc_quickack_files_per_s", "files/s", SECTION_DICOM,
               "pynetdicom, one association, TCP_NODELAY and TCP_QUICKACK re-armed before every read"),
    FigureSpec("cstore_files_per_s", "files/s", SECTION_DICOM, "the agent with transport cstore, backlog as above"),
    FigureSpec("ratio_cstore_vs_storescu", "ratio", SECTION_DICOM, "agent C-STORE rate / storescu rate"),
    FigureSpec("ratio_fastest_client_vs_storescu", "ratio", SECTION_DICOM,
               "the fastest raw client of the run, REST or DICOM / storescu rate: the highest ratio to storescu "
               "that any client reached against this Orthanc on this machine"),
    # The agent alone.
    FigureSpec("agent_backlog_seconds_to_first", "s", SECTION_AGENT,
               "from the agent's process start to the first file of the backlog in Orthanc"),
    FigureSpec("agent_backlog_after_first_files_per_s", "files/s", SECTION_AGENT,
               "the backlog rate after the first file was stored, so without the agent's start-up"),
    FigureSpec("ratio_agent_after_start_vs_best_rest", "ratio", SECTION_AGENT,
               "agent backlog rate after its first stored file / best raw REST client rate (the raw clients "
               "run inside the benchmark's process, so they start no interpreter)"),
    FigureSpec("agent_latency_p50_s", "s", SECTION_AGENT,
               "median delay from a file's close to its instance in Orthanc's change feed"),
    FigureSpec("agent_latency_p99_s", "s", SECTION_AGENT, "99th percentile of the same delay"),
    FigureSpec("agent_idle_rss_mb", "MiB", SECTION_AGENT, "the agent's peak RSS after its start and one small file"),
    FigureSpec("agent_peak_rss_mb_large_file", "MiB", SECTION_AGENT,
               "the agent's peak RSS (VmHWM) after sending one large file, of the size below"),
    FigureSpec("agent_large_file_mb", "MB", SECTION_AGENT, "size of that large file"),
    FigureSpec("agent_large_file_seconds", "s", SECTION_AGENT, "from the large file's rename into the folder to its instance in Orthanc"),
    FigureSpec("agent_peak_rss_mb_2gb_file", "MiB", SECTION_AGENT,
               "the agent's peak RSS while sending a 2 GB file (set only when the large file is 2 GB)"),
    # The sync.
    FigureSpec("sync_stable_to_record_p50_s", "s", SECTION_SYNC,
               "median delay from a StableStudy change seen in /changes to the study's MongoDB record"),
    FigureSpec("sync_stable_to_record_p99_s", "s", SECTION_SYNC, "99th percentile of the same delay"),
    FigureSpec("sync_live_upload_s", "s", SECTION_SYNC,
               "storing the backlog's studies in Orthanc while the sync follows the change feed"),
    FigureSpec("sync_catchup_studies", "studies", SECTION_SYNC,
               "studies in Orthanc when the sync starts on an empty MongoDB database"),
    FigureSpec("sync_catchup_studies_per_s", "studies/s", SECTION_SYNC,
               "studies recorded per second, from the sync's start until every study has a record"),
    FigureSpec("idle_cycle_studies", "studies", SECTION_SYNC, "studies in Orthanc and MongoDB during the idle measurements"),
    FigureSpec("sync_idle_cycle_bytes", "bytes", SECTION_SYNC,
               "bytes on the wire (Orthanc and MongoDB, both directions) per idle /changes poll of the sync"),
    FigureSpec("sync_idle_cycle_requests", "requests", SECTION_SYNC, "HTTP requests and MongoDB messages per idle poll"),
    FigureSpec("poll_idle_cycle_bytes", "bytes", SECTION_SYNC,
               "bytes on the wire of one cycle of today's poller: GET /studies?expand and every record from MongoDB"),
    FigureSpec("poll_idle_cycle_requests", "requests", SECTION_SYNC, "HTTP requests and MongoDB messages of that cycle"),
    FigureSpec("sync_idle_cycle_bytes_10k_studies", "bytes", SECTION_SYNC,
               "sync_idle_cycle_bytes with 10,000 studies (set only in a run with 10,000 studies)"),
    FigureSpec("poll_idle_cycle_bytes_10k_studies", "bytes", SECTION_SYNC,
               "poll_idle_cycle_bytes with 10,000 studies (set only in a run with 10,000 studies)"),
    # The fleet.
    FigureSpec("fleet_machines", "machines", SECTION_FLEET, "simulated imaging machines"),
    FigureSpec("fleet_agent_processes", "processes", SECTION_FLEET, "agent processes, one per machine when they fit"),
    FigureSpec("fleet_machines_per_process", "machines", SECTION_FLEET,
               "[[machine]] entries per agent process, each with its own folder, user and AE title"),
    FigureSpec("fleet_agent_restarts", "restarts", SECTION_FLEET,
               "agent processes that exited and were restarted 5 s later, as the deployed unit's Restart=always does"),
    FigureSpec("fleet_files_dropped", "files", SECTION_FLEET, "files landed in the machines' export folders"),
    FigureSpec("fleet_mb_dropped", "MB", SECTION_FLEET, "their size"),
    FigureSpec("fleet_files_sent", "files", SECTION_FLEET, "files the agents report as sent (files_sent_today in their status files)"),
    FigureSpec("fleet_files_stored", "files", SECTION_FLEET, "instances in Orthanc (/statistics)"),
    FigureSpec("fleet_files_recorded", "files", SECTION_FLEET, "instances counted by the MongoDB study records (sum of instanceCount)"),
    FigureSpec("fleet_files_lost", "files", SECTION_FLEET, "files dropped but missing in Orthanc or in MongoDB's counts"),
    FigureSpec("fleet_studies_wrong_source", "studies", SECTION_FLEET, "study records whose sourceMachine is not the machine that exported them"),
    FigureSpec("fleet_seconds_to_stored", "s", SECTION_FLEET, "from the first study landing until Orthanc stores every file"),
    FigureSpec("fleet_seconds_to_recorded", "s", SECTION_FLEET, "from the first study landing until MongoDB counts every file"),
    FigureSpec("fleet_agents_start_s", "s", SECTION_FLEET, "from starting the first agent until every agent wrote its status file"),
    # The dashboard.
    FigureSpec("fleet_page_machines", "machines", SECTION_DASHBOARD, "machines in the dashboard's inventory"),
    FigureSpec("fleet_page_studies", "studies", SECTION_DASHBOARD, "study records in MongoDB behind the fleet page"),
    FigureSpec("fleet_page_p50_ms", "ms", SECTION_DASHBOARD, "median time to serve the fleet page, logged in"),
    FigureSpec("fleet_page_p95_ms", "ms", SECTION_DASHBOARD, "95th percentile of the same time"),
    FigureSpec("dashboard_fleet_page_p95_ms", "ms", SECTION_DASHBOARD,
               "fleet_page_p95_ms with 200 machines and 100,000 studies (set only in a run of that size)"),
    # Deploys.
    FigureSpec("deploy_lab_boot_s", "s", SECTION_DEPLOY, "booting the fresh lab hosts (not part of the deploy figures)"),
    FigureSpec("deploy_lab_cold_s", "s", SECTION_DEPLOY, "dicomfleet deploy on fresh lab hosts"),
    FigureSpec("deploy_lab_rerun_s", "s", SECTION_DEPLOY, "dicomfleet deploy again, nothing changed"),
    FigureSpec("deploy_rerun_changes", "operations", SECTION_DEPLOY, "operations pyinfra reported as changed on the rerun"),
    FigureSpec("ansible_lab_rerun_s", "s", SECTION_DEPLOY, "ansible-playbook on the same, already converged hosts"),
    FigureSpec("ansible_rerun_changes", "tasks", SECTION_DEPLOY, "tasks Ansible reported as changed on its rerun"),
    FigureSpec("ratio_ansible_vs_pyinfra_rerun", "ratio", SECTION_DEPLOY, "Ansible rerun time / pyinfra rerun time"),
]

SPECS: dict[str, FigureSpec] = {spec.key: spec for spec in _SPECS}

# The keys the project's performance claims are read from.
REQUIRED_KEYS = (
    "agent_backlog_files_per_s", "best_rest_client_files_per_s", "curl_loop_files_per_s",
    "ratio_agent_vs_best_rest", "ratio_agent_vs_curl_loop", "agent_latency_p50_s", "agent_latency_p99_s",
    "cstore_files_per_s", "storescu_files_per_s", "ratio_cstore_vs_storescu",
    "agent_peak_rss_mb_2gb_file", "sync_stable_to_record_p50_s", "sync_catchup_studies_per_s",
    "sync_idle_cycle_bytes_10k_studies", "poll_idle_cycle_bytes_10k_studies", "fleet_machines",
    "fleet_files_sent", "fleet_files_stored", "fleet_files_lost", "dashboard_fleet_page_p95_ms",
    "deploy_lab_cold_s", "deploy_lab_rerun_s", "deploy_rerun_changes", "ratio_ansible_vs_pyinfra_rerun",
)

REST_BASELINE_KEYS = ("curl_loop_files_per_s", "xargs_curl_files_per_s", "keepalive_sequential_files_per_s",
                      "keepalive_4_workers_files_per_s")
DICOM_CLIENT_KEYS = ("storescu_files_per_s", "dcmsend_files_per_s", "pynetdicom_1assoc_files_per_s",
                     "pynetdicom_1assoc_nodelay_files_per_s", "pynetdicom_4assoc_files_per_s",
                     "pynetdicom_1assoc_quickack_files_per_s")

TWO_GB = 2_000_000_000
TEN_THOUSAND = 10_000
FLEET_PAGE_MACHINES = 200
FLEET_PAGE_STUDIES = 100_000


@dataclasses.dataclass
class Figure:
    """A measured value with the command behind it."""

    value: float | int | None
    command: str = ""
    note: str = ""
    samples: list[float] = dataclasses.field(default_factory=list)


class Results:
    """Collects the figures of one run and turns them into the latest.json document."""

    def __init__(self):
        self.figures: dict[str, Figure] = {}
        self.not_measured: dict[str, str] = {}

    def set(self, key: str, value: float | int | None, command: str = "", note: str = "",
            samples: list[float] | None = None) -> None:
        """Record KEY's VALUE; for a None value, NOTE gives the reason nothing was measured."""
        if key not in SPECS:
            raise KeyError(f"{key!r} is not a benchmark figure; add it to bench.results.SPECS first.")
        self.figures[key] = Figure(value, command, note, list(samples or []))
        if value is None:
            self.not_measured[key] = note or "the measurement did not produce a value"
        else:
            self.not_measured.pop(key, None)

    def skip(self, keys, reason: str) -> None:
        """Mark KEYS as not measured in this run, for REASON."""
        for key in keys:
            self.set(key, None, note=reason)

    def value(self, key: str) -> float | int | None:
        """Return KEY's value, or None."""
        figure = self.figures.get(key)
        return None if figure is None else figure.value

    def derive(self) -> None:
        """Compute the best REST client, the ratios and the full-size figures (2 GB, 10,000 and 100,000 studies)."""
        rest = {key: self.value(key) for key in REST_BASELINE_KEYS if self.value(key) is not None}
        if rest:
            best = max(rest, key=rest.get)
            self.set("best_rest_client_files_per_s", rest[best], self.figures[best].command,
                     f"the fastest raw REST client was {SPECS[best].description}")
        elif "best_rest_client_files_per_s" not in self.figures:
            self.skip(["best_rest_client_files_per_s"], "no raw REST client was measured")

        self._ratio("ratio_agent_vs_best_rest", "agent_backlog_files_per_s", "best_rest_client_files_per_s")
        self._ratio("ratio_agent_vs_curl_loop", "agent_backlog_files_per_s", "curl_loop_files_per_s")
        self._ratio("ratio_agent_after_start_vs_best_rest", "agent_backlog_after_first_files_per_s",
                    "best_rest_client_files_per_s")
        self._ratio("ratio_cstore_vs_storescu", "cstore_files_per_s", "storescu_files_per_s")
        clients = [key for key in REST_BASELINE_KEYS + DICOM_CLIENT_KEYS if self.value(key) is not None]
        if clients:
            fastest = max(clients, key=self.value)
            self._ratio("ratio_fastest_client_vs_storescu", fastest, "storescu_files_per_s")
        self._ratio("ratio_ansible_vs_pyinfra_rerun", "ansible_lab_rerun_s", "deploy_lab_rerun_s")

        large = self.value("agent_large_file_mb")
        self._copy_if("agent_peak_rss_mb_2gb_file", "agent_peak_rss_mb_large_file",
                      large is not None and large * 1_000_000 >= TWO_GB * 0.99,
                      "the large file of this run is smaller than 2 GB (quick mode)")
        studies = self.value("idle_cycle_studies")
        for target, source in (("sync_idle_cycle_bytes_10k_studies", "sync_idle_cycle_bytes"),
                               ("poll_idle_cycle_bytes_10k_studies", "poll_idle_cycle_bytes")):
            self._copy_if(target, source, studies is not None and studies >= TEN_THOUSAND,
                          "this run held fewer than 10,000 studies (quick mode)")
        page_machines = self.value("fleet_page_machines") or 0
        page_studies = self.value("fleet_page_studies") or 0
        self._copy_if("dashboard_fleet_page_p95_ms", "fleet_page_p95_ms",
                      page_machines >= FLEET_PAGE_MACHINES and page_studies >= FLEET_PAGE_STUDIES,
                      "the fleet page was measured with fewer than 200 machines or 100,000 studies (quick mode)")

    def _ratio(self, key: str, numerator: str, denominator: str) -> None:
        value = ratio(self.value(numerator), self.value(denominator))
        if value is None:
            missing = [name for name in (numerator, denominator) if self.value(name) is None]
            self.set(key, None, note="not computed: " + ", ".join(missing) + " not measured")
            return
        self.set(key, value, note=f"{numerator} / {denominator}")

    def _copy_if(self, target: str, source: str, condition: bool, reason: str) -> None:
        figure = self.figures.get(source)
        if figure is None or figure.value is None:
            self.set(target, None, note=self.not_measured.get(source) or f"{source} not measured")
        elif not condition:
            self.set(target, None, note=reason)
        else:
            self.set(target, figure.value, figure.command, figure.note, figure.samples)

    def document(self, run: dict, machine: dict) -> dict:
        """Return the latest.json document: every key of SPECS at the top level, then the details."""
        document: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "run": run, "machine": machine}
        for key in SPECS:
            document[key] = self.value(key)
        for key in SPECS:
            if key not in self.figures and key not in self.not_measured:
                self.not_measured[key] = "not run in this invocation"
        document["figures"] = {
            key: {"unit": SPECS[key].unit, "description": SPECS[key].description,
                  "command": figure.command, "note": figure.note, "samples": figure.samples}
            for key, figure in self.figures.items() if figure.value is not None
        }
        document["not_measured"] = {key: self.not_measured[key] for key in SPECS if key in self.not_measured}
        return document


def write_json(path: Path, document: dict) -> None:
    """Write DOCUMENT to PATH atomically, through PATH.tmp."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)
