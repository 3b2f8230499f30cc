"""Run the agent: ``dicomfleet agent --config PATH [--log-level LEVEL]``.

Runs until SIGTERM or SIGINT, then lets each worker finish its file in flight,
closes the spool and exits 0. Exits 2 when the configuration, a password or
the spool cannot be read, and 1 when the folder watcher failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from dicomfleet import __version__
from dicomfleet.agent import status
from dicomfleet.agent.config import AgentConfig, ConfigError, load_config
from dicomfleet.agent.heartbeat import HeartbeatSender
from dicomfleet.agent.password import PasswordError, read_password
from dicomfleet.agent.repeats import RepeatedProblems
from dicomfleet.agent.sender import Sender
from dicomfleet.agent.spool import Spool, SpoolError
from dicomfleet.agent.watcher import FolderWatcher
from dicomfleet.metrics_endpoint import MetricsEndpoint

log = logging.getLogger("dicomfleet.agent")

EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet agent",
                                     description="Watch export folders and send each finished DICOM file to Orthanc.")
    parser.add_argument("--config", required=True, help="the agent configuration (TOML), e.g. /etc/dicomfleet/agent.toml")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="the lowest level written to stderr (default: INFO)")
    return parser


def configure_logging(level: str) -> None:
    """Log to stderr; without timestamps under systemd, because journald adds its own."""
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s [%(threadName)s]: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, stream=sys.stderr, force=True)
    # pynetdicom logs every association and every C-STORE request at INFO; the agent logs each file itself.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, getattr(logging, level)))


def main(args: list[str] | None = None) -> int:
    """Run the agent until SIGTERM or SIGINT; return the exit status."""
    options = _build_parser().parse_args(args)
    configure_logging(options.log_level)

    try:
        config = load_config(options.config)
    except ConfigError as error:
        for problem in error.problems:
            log.error("%s", problem)
        log.error("The agent did not start: fix %s and start it again.", options.config)
        return EXIT_CONFIG

    try:
        passwords = {machine.id: read_password(machine) for machine in config.machines}
    except PasswordError as error:
        log.error("%s", error)
        return EXIT_CONFIG

    for machine in config.machines:
        if machine.ca_file and not os.path.isfile(machine.ca_file):
            log.error("%s: the ca_file %r of machine %r is not a file; install the CA certificate that signs "
                      "Orthanc's HTTPS certificate there, or remove the key.", config.path, machine.ca_file, machine.id)
            return EXIT_CONFIG

    try:
        config.quarantine.mkdir(parents=True, exist_ok=True)
        spool = Spool(config.spool)
    except (OSError, SpoolError) as error:
        log.error("%s", error)
        return EXIT_CONFIG

    machines = ", ".join(f"{m.id} ({m.modality}, {'polled' if m.polling else 'inotify'}, {m.orthanc_url})"
                         for m in config.machines)
    log.info("dicomfleet agent %s starting with %s: machines %s; spool %s; %d workers.",
             __version__, config.path, machines, config.spool, config.workers)
    recovered = spool.recover_interrupted()
    if recovered:
        log.info("Requeued %d files that were being sent when the agent last stopped; Orthanc returns "
                 "AlreadyStored for any it had stored.", recovered)

    stop = threading.Event()
    watcher_failed = threading.Event()

    def request_stop(signum, frame) -> None:
        if not stop.is_set():
            log.info("Received %s; finishing the files in flight, then stopping.", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    started_at = time.time()
    sender = Sender(config, spool, passwords, stop)
    watcher = FolderWatcher(config, spool, sender.notify, stop)
    watcher_thread = threading.Thread(target=_run_watcher, args=(watcher, stop, watcher_failed),
                                      name="watcher", daemon=True)
    sender.start()
    watcher_thread.start()

    heartbeats = None
    if config.heartbeat is not None:
        heartbeats = HeartbeatSender(config.heartbeat, [machine.id for machine in config.machines],
                                     lambda: status.build_status(config, spool, sender, started_at), stop)
        heartbeats.start()

    metrics = None
    if config.metrics_listen is not None:
        # Imported here, because prometheus_client costs start-up time that an agent without metrics saves.
        from dicomfleet.agent.metrics import AgentCollector

        metrics = MetricsEndpoint(config.metrics_listen, AgentCollector(config, spool, sender), "agent")
        metrics.start()

    problems = RepeatedProblems(log)
    while not stop.is_set():
        _write_status(config, spool, sender, started_at, problems)
        stop.wait(status.INTERVAL_S)

    watcher_thread.join()
    sender.join()
    if heartbeats is not None:
        heartbeats.join(config.heartbeat.timeout_s + 1)
    _write_status(config, spool, sender, started_at, problems)
    if metrics is not None:
        metrics.stop()
    spool.close()
    if watcher_failed.is_set():
        log.error("dicomfleet agent stopped after the folder watcher failed.")
        return EXIT_FAILURE
    log.info("dicomfleet agent stopped.")
    return 0


def _run_watcher(watcher: FolderWatcher, stop: threading.Event, failed: threading.Event) -> None:
    try:
        watcher.run()
    except Exception:
        log.exception("The folder watcher failed; stopping the agent so that systemd restarts it.")
        failed.set()
        stop.set()


def _write_status(config: AgentConfig, spool: Spool, sender: Sender, started_at: float,
                  problems: RepeatedProblems) -> None:
    try:
        document = status.build_status(config, spool, sender, started_at)
        status.write_status(config.status_file, document)
    except Exception as error:
        problems.report("status", f"Cannot write the status file {config.status_file}: {error}.")
        return
    problems.clear("status", f"The status file {config.status_file} is written again.")


if __name__ == "__main__":
    raise SystemExit(main())
