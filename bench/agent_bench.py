"""Measure the agent as a real ``dicomfleet agent`` process: backlog throughput, latency and memory.

Backlog: files waiting when it starts, until /statistics counts them all. Latency: from a
file's close to its instance in the change feed. Memory: peak RSS while it sends one large file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dicomfleet import localservers

from bench import dataset
from bench.archive import AGENT_MACHINE, BenchArchive
from bench.stats import TimedRun, percentile

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


def read_peak_rss_kib(status_text: str) -> int | None:
    """Return VmHWM (the peak resident set size, in KiB) from the text of /proc/PID/status."""
    for line in status_text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def agent_command(config: Path) -> list[str]:
    """Return the command line that starts the agent on CONFIG, as the deployed unit does."""
    return [sys.executable, "-m", "dicomfleet", "agent", "--config", str(config), "--log-level", "INFO"]


class AgentProcess:
    """The agent as a subprocess with its log in a file."""

    def __init__(self, config: Path, log_path: Path):
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> "AgentProcess":
        """Start the agent; its stderr goes to the log file."""
        with open(self.log_path, "ab") as handle:
            self.process = subprocess.Popen(agent_command(self.config), stdout=handle, stderr=subprocess.STDOUT)
        log.info("Agent started with PID %d on %s.", self.process.pid, self.config)
        return self

    @property
    def running(self) -> bool:
        """True while the agent process runs."""
        return self.process is not None and self.process.poll() is None

    def peak_rss_kib(self) -> int | None:
        """Return the agent's peak resident set size so far, in KiB."""
        try:
            text = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        return read_peak_rss_kib(text)

    def stop(self) -> int | None:
        """Stop the agent with SIGTERM (SIGKILL after STOP_TIMEOUT_S); return its exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("The agent (PID %d) did not stop within %.0f s of SIGTERM; killing it.",
                          self.process.pid, STOP_TIMEOUT_S)
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, characters: int = 2000) -> str:
        """Return the end of the agent's log."""
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""


class AgentBench:
    """One agent machine of the benchmark site: its watch folder, state and configuration."""

    def __init__(self, archive: BenchArchive, folder: Path, machine_id: str = AGENT_MACHINE):
        self.archive = archive
        self.folder = folder
        machine = archive.site.machines[machine_id]
        self.watch = Path(machine.watch_folders[0])
        self.state = folder / "agent-state"
        self.transport = machine.transport
        self.config = localservers.write_agent_config(archive.site, machine.host, folder, archive.orthanc.secrets)
        self.log_path = folder / "agent.log"

    def clear(self) -> None:
        """Empty the watch folder and the agent's spool, quarantine and status file."""
        shutil.rmtree(self.watch, ignore_errors=True)
        self.watch.mkdir(parents=True)
        shutil.rmtree(self.state, ignore_errors=True)

    def new_process(self) -> AgentProcess:
        """Return an agent process for this machine, not started."""
        return AgentProcess(self.config, self.log_path)

    def wait_ready(self, agent: AgentProcess, probe: bytes) -> bool:
        """Drop PROBE (a DICOM file) into the watch folder and wait until Orthanc stores it.

        A stored probe shows that the agent watches its folder and reaches Orthanc.
        """
        before = self.archive.count_instances()
        (self.watch / "probe.dcm").write_bytes(probe)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not agent.running:
                return False
            if self.archive.count_instances() > before:
                return True
            time.sleep(0.05)
        return False


def measure_backlog(bench: AgentBench, files: list[Path]) -> tuple[TimedRun, float | None]:
    """Start the agent on a watch folder already holding FILES; time until Orthanc stores them all.

    Returns the run, timed from the agent's start (Python start-up included), and
    the seconds until Orthanc stored the first file.
    """
    bench.clear()
    for path in files:
        os.link(path, bench.watch / path.name)

    agent = bench.new_process()
    started = time.monotonic()
    agent.start()
    first_seen = None
    deadline = started + max(120.0, len(files) * 0.5)
    stored = 0
    while time.monotonic() < deadline and agent.running:
        stored = bench.archive.count_instances()
        if stored and first_seen is None:
            first_seen = time.monotonic()
        if stored >= len(files):
            break
        time.sleep(0.025)
    finished = time.monotonic()
    status = agent.stop()

    note = ""
    if stored < len(files):
        note = f"{stored} of {len(files)} stored; agent exit status {status}; log: {agent.log_tail(500)}"
        log.error("The agent did not store its backlog: %s", note)
    run = TimedRun(f"dicomfleet agent, backlog, {bench.transport}", len(files), finished - started, stored,
                   " ".join(agent_command(bench.config)), note)
    time_to_first = None if first_seen is None else first_seen - started
    return run, time_to_first


@dataclasses.dataclass
class LatencyResult:
    """Per-file latency from close-write to the instance in Orthanc's change feed."""

    latencies_s: list[float]
    files: int
    missing: int
    rate_per_s: float
    poll_interval_s: float

    @property
    def p50(self) -> float | None:
        """The median latency, or None when a file never arrived."""
        return None if self.missing else percentile(self.latencies_s, 0.5)

    @property
    def p99(self) -> float | None:
        """The 99th percentile latency, or None when a file never arrived."""
        return None if self.missing else percentile(self.latencies_s, 0.99)


class ChangeWatcher:
    """Polls Orthanc's change feed in a thread and notes when each NewInstance is first seen."""

    def __init__(self, archive: BenchArchive, interval: float):
        self.archive = archive
        self.interval = interval
        self.seen: dict[str, float] = {}
        self.stop_event = threading.Event()
        self.since = archive.last_change()
        self.thread = threading.Thread(target=self._run, name="bench-change-watcher", daemon=True)

    def start(self) -> "ChangeWatcher":
        """Start polling."""
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop_event.is_set():
            page = self.archive.changes(self.since)
            now = time.monotonic()
            for change in page["Changes"]:
                if change["ChangeType"] == "NewInstance":
                    self.seen.setdefault(change["ID"], now)
            self.since = page["Last"]
            if page["Done"]:
                self.stop_event.wait(self.interval)

    def stop(self) -> None:
        """Stop polling and wait for the thread."""
        self.stop_event.set()
        self.thread.join()


def measure_latency(bench: AgentBench, count: int, rate_per_s: float, poll_interval: float = 0.01,
                    timeout: float = 60.0) -> LatencyResult:
    """Write COUNT CT slices one by one at RATE_PER_S into the running agent's folder; time each one.

    A file's clock starts when its writer closes it, as a scanner's export does,
    and stops when the poller first reads its NewInstance change.
    """
    bench.clear()
    writer = dataset.SeriesWriter("CT", patient_prefix="LATENCY")
    encoded = writer.encode_series(count + 1)
    probe, _ = encoded[0]
    files = encoded[1:]

    agent = bench.new_process().start()
    try:
        if not bench.wait_ready(agent, probe):
            log.error("The agent did not store its probe file; log: %s", agent.log_tail())
            return LatencyResult([], count, count, rate_per_s, poll_interval)

        watcher = ChangeWatcher(bench.archive, poll_interval).start()
        closed: dict[str, float] = {}
        interval = 1.0 / rate_per_s
        next_slot = time.monotonic()
        for number, (data, identifiers) in enumerate(files):
            with open(bench.watch / f"latency_{number:04d}.dcm", "wb") as handle:
                handle.write(data)
            closed[identifiers.orthanc_id] = time.monotonic()
            next_slot += interval
            time.sleep(max(0.0, next_slot - time.monotonic()))

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(key in watcher.seen for key in closed):
            time.sleep(0.05)
        watcher.stop()
    finally:
        agent.stop()

    latencies = [watcher.seen[key] - closed[key] for key in closed if key in watcher.seen]
    missing = len(closed) - len(latencies)
    if missing:
        log.error("%d of %d files did not reach Orthanc within %.0f s.", missing, len(closed), timeout)
    return LatencyResult(latencies, count, missing, rate_per_s, poll_interval)


@dataclasses.dataclass
class MemoryResult:
    """Peak RSS of the agent before and after it sent one large file."""

    file_bytes: int
    idle_peak_kib: int | None
    peak_kib: int | None
    stored: bool
    seconds: float


def measure_large_file_memory(bench: AgentBench, staging: Path, target_bytes: int,
                              timeout: float = 900.0) -> MemoryResult:
    """Move one TARGET_BYTES DICOM file into the running agent's folder; return its peak RSS.

    The file is written into STAGING (same file system) first and renamed into
    the watch folder, so the agent finds it complete. It is deleted afterwards.
    """
    bench.clear()
    staging.mkdir(parents=True, exist_ok=True)
    large = dataset.write_large_instance(staging / "large.dcm", target_bytes)
    probe, _ = dataset.SeriesWriter("CT", patient_prefix="PROBE").encode_series(1)[0]

    agent = bench.new_process().start()
    target = bench.watch / "large.dcm"
    try:
        if not bench.wait_ready(agent, probe):
            log.error("The agent did not store its probe file; log: %s", agent.log_tail())
            return MemoryResult(large.size, None, None, False, 0.0)
        idle_peak = agent.peak_rss_kib()

        before = bench.archive.count_instances()
        started = time.monotonic()
        os.rename(large.path, target)
        stored = bench.archive.wait_for_instances(before + 1, timeout, interval=0.5) is not None
        seconds = time.monotonic() - started
        peak = agent.peak_rss_kib()
    finally:
        agent.stop()
        target.unlink(missing_ok=True)
        large.path.unlink(missing_ok=True)

    if not stored:
        log.error("Orthanc did not store the %d-byte file within %.0f s; agent log: %s",
                  large.size, timeout, agent.log_tail())
    return MemoryResult(large.size, idle_peak, peak, stored, seconds)
