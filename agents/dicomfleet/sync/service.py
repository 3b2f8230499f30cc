"""The ``dicomfleet sync`` command: run the sync service until SIGTERM or SIGINT.

``dicomfleet sync reconcile`` is handed to the reconcile module.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import pymongo.errors

from dicomfleet import __version__
from dicomfleet.metrics_endpoint import MetricsEndpoint
from dicomfleet.sync import reconcile
from dicomfleet.sync.config import ConfigError, load_config
from dicomfleet.sync.context import open_context
from dicomfleet.sync.feed import ChangeFollower
from dicomfleet.sync.metrics import SyncCollector
from dicomfleet.sync.store import redact_uri

log = logging.getLogger(__name__)

EXIT_CONFIG_ERROR = 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomfleet sync",
        description="Follow one Orthanc server's change feed and keep one MongoDB record per study.",
        epilog="Run 'dicomfleet sync reconcile --config PATH [--repair]' to compare Orthanc with "
               "MongoDB once (a dry run unless --repair is given).",
    )
    parser.add_argument("--config", required=True, help="the sync's TOML configuration (sync.toml)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log level on stderr, which journald keeps (default INFO)")
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # urllib3 logs every new connection at DEBUG, which adds nothing to the sync's own lines.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def _install_signal_handlers(stop: threading.Event) -> None:
    def request_stop(number: int, _frame) -> None:
        if not stop.is_set():
            log.info("Received %s; stopping after the current step.", signal.Signals(number).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


def main(args: list[str] | None = None) -> int:
    """Run the sync service, or ``reconcile`` when that is the first argument."""
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] == "reconcile":
        return reconcile.main(args[1:])

    options = _build_parser().parse_args(args)
    _configure_logging(options.log_level)

    stop = threading.Event()
    _install_signal_handlers(stop)
    try:
        config = load_config(options.config)
        context = open_context(config, stop)
    except ConfigError as error:
        for problem in error.problems:
            log.error("%s", problem)
        return EXIT_CONFIG_ERROR
    except pymongo.errors.ConfigurationError as error:
        log.error("%s: [mongodb] uri is invalid: %s", options.config, error)
        return EXIT_CONFIG_ERROR

    if config.reconcile_interval_s:
        periodic = f"every {config.reconcile_interval_s:.0f} s"
    else:
        periodic = "off"
    log.info("Sync %s started: %s into MongoDB %s database %s; %d machines, patient_id_policy %s, "
             "on_delete %s, periodic reconcile %s.", __version__, context.orthanc.label,
             redact_uri(config.mongodb.uri), config.mongodb.database, len(config.machines),
             config.records.patient_id_policy, config.records.on_delete, periodic)
    metrics = None
    if config.metrics_listen is not None:
        metrics = MetricsEndpoint(config.metrics_listen, SyncCollector(context), "sync")
        metrics.start()

    try:
        ChangeFollower(context).run()
    except Exception:
        # An unexpected response, such as an Orthanc that rejects /changes, ends
        # the service so that its systemd unit restarts it.
        log.exception("Sync failed with an unexpected error; exiting with status 1.")
        return 1
    finally:
        if metrics is not None:
            metrics.stop()
        context.close()
    log.info("Sync stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
