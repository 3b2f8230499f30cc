"""Run the dashboard: ``dicomfleet dashboard --config PATH [--log-level LEVEL]``.

Serves the pages and the heartbeat API with waitress until SIGTERM or SIGINT,
then exits 0. Exits 2 when the configuration or a secret cannot be read.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

import pymongo
import pymongo.errors
import waitress

from dicomfleet import __version__
from dicomfleet.dashboard import auth
from dicomfleet.dashboard.app import Runtime, create_app
from dicomfleet.dashboard.config import ConfigError, DashboardConfig, load_config, read_secret
from dicomfleet.dashboard.heartbeats import HeartbeatBook
from dicomfleet.dashboard.orthanc import OrthancClient, OrthancWatch, PreviewCache
from dicomfleet.dashboard import fleet
from dicomfleet.dashboard.studies import ActivityWatch, LastStudyScanner, StudyIndex

log = logging.getLogger(__name__)

EXIT_CONFIG = 2


def connect_mongodb(config: DashboardConfig) -> pymongo.MongoClient:
    """Return a lazily connecting client for the configured MongoDB, with short timeouts."""
    return pymongo.MongoClient(config.mongodb_uri, appname="dicomfleet-dashboard", tz_aware=True,
                               serverSelectionTimeoutMS=3000, connectTimeoutMS=3000, socketTimeoutMS=30000)


def build_runtime(config: DashboardConfig, client: pymongo.MongoClient, stop: threading.Event,
                  start_threads: bool = True) -> Runtime:
    """Read the secrets, load the stored heartbeats and start the Orthanc and study threads.

    Raises ConfigError when a secret cannot be read.
    """
    password = read_secret(config.login_credential, config.login_password_file,
                           f"the password of the dashboard user {config.login}")
    session_key = read_secret(config.session_key_credential, config.session_key_file,
                              "the key that signs session cookies")
    orthanc_password = read_secret(config.orthanc.credential, config.orthanc.password_file,
                                   f"the Orthanc password of user {config.orthanc.username}")

    database = client[config.mongodb_database]
    book = HeartbeatBook(config, database)
    loaded = book.load()
    log.info("Loaded the stored heartbeats of %d machines.", loaded)

    studies = StudyIndex(database, config.orthanc.name)
    orthanc_client = OrthancClient(config.orthanc, orthanc_password)
    watch = OrthancWatch(orthanc_client, database, stop)
    scanner = LastStudyScanner(studies, stop)
    activity = None
    if config.activity_refresh_s > 0:
        activity = ActivityWatch(studies, lambda: fleet.day_start(fleet.local_now(config)), stop,
                                 config.activity_refresh_s)
    if start_threads:
        book.start(stop)
        watch.start()
        scanner.start()
        if activity is not None:
            activity.start()

    return Runtime(config=config, guard=auth.LoginGuard(config.login, password), session_key=session_key,
                   book=book, studies=studies, orthanc=watch, previews=PreviewCache(orthanc_client),
                   activity=activity)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet dashboard",
                                     description="Serve the fleet dashboard and receive the agents' heartbeats.")
    parser.add_argument("--config", required=True, help="the dashboard configuration (TOML), "
                                                        "e.g. /etc/dicomfleet/dashboard.toml")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="the lowest level written to stderr (default: INFO)")
    return parser


def _configure_logging(level: str) -> None:
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level), format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("pymongo").setLevel(logging.WARNING)
    # waitress logs each queue-depth warning; its own "Serving on" line is replaced by ours.
    logging.getLogger("waitress").setLevel(logging.WARNING)


def main(args: list[str] | None = None) -> int:
    """Run the dashboard until SIGTERM or SIGINT; return the exit status."""
    options = _build_parser().parse_args(args)
    _configure_logging(options.log_level)

    stop = threading.Event()
    try:
        config = load_config(options.config)
        client = connect_mongodb(config)
        runtime = build_runtime(config, client, stop)
    except ConfigError as error:
        for problem in error.problems:
            log.error("%s", problem)
        log.error("The dashboard did not start: fix %s and start it again.", options.config)
        return EXIT_CONFIG
    except pymongo.errors.ConfigurationError as error:
        log.error("%s: [mongodb] uri is invalid: %s", options.config, error)
        return EXIT_CONFIG

    app = create_app(runtime)
    server = waitress.create_server(app, host=config.listen, port=config.port, threads=config.threads,
                                    ident="dicomfleet-dashboard", clear_untrusted_proxy_headers=False)

    def request_stop(signum, _frame) -> None:
        log.info("Received %s; stopping the dashboard.", signal.Signals(signum).name)
        stop.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    log.info("dicomfleet dashboard %s for site %s serving http://%s:%s/ with %d machines; Orthanc %s at %s.",
             __version__, config.site, server.effective_host, server.effective_port, len(config.machines),
             config.orthanc.name, config.orthanc.url)
    try:
        server.run()
    finally:
        stop.set()
        if runtime.book.thread is not None:
            runtime.book.thread.join(timeout=10)
        client.close()
    log.info("dicomfleet dashboard stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
