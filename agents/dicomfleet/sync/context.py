"""Hold the sync's connections to Orthanc and MongoDB and call them with retries.

The change follower, the study updater and reconcile share one context, so an
outage is logged once whichever of them meets it first.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, TypeVar

import pymongo

from dicomfleet.sync import store
from dicomfleet.sync.config import SyncConfig
from dicomfleet.sync.metrics import SyncStats
from dicomfleet.sync.orthanc import OrthancClient, OrthancUnavailable
from dicomfleet.sync.provenance import MachineDirectory
from dicomfleet.sync.retry import Outage, call_with_retry

T = TypeVar("T")


@dataclasses.dataclass
class SyncContext:
    """The configuration, the clients and the outage state of one running sync."""

    config: SyncConfig
    orthanc: OrthancClient
    mongo_client: pymongo.MongoClient
    studies: store.StudyStore
    checkpoints: store.CheckpointStore
    directory: MachineDirectory
    stop: threading.Event
    orthanc_outage: Outage
    mongodb_outage: Outage
    # None retries until success (the service); a number gives up after that many failures (the CLI).
    max_attempts: int | None = None
    # Progress counters for the metrics endpoint.
    stats: SyncStats = dataclasses.field(default_factory=SyncStats)

    def call_orthanc(self, action: str, call: Callable[[], T]) -> T:
        """Return CALL's result, retrying while Orthanc is unavailable; ACTION names it in the log."""
        return call_with_retry(call, outage=self.orthanc_outage, transient=(OrthancUnavailable,),
                               action=action, stop=self.stop, max_attempts=self.max_attempts)

    def call_mongodb(self, action: str, call: Callable[[], T]) -> T:
        """Return CALL's result, retrying while MongoDB is unavailable; ACTION names it in the log."""
        return call_with_retry(call, outage=self.mongodb_outage, transient=store.TRANSIENT_ERRORS,
                               action=action, stop=self.stop, max_attempts=self.max_attempts)

    def close(self) -> None:
        """Close the Orthanc session and the MongoDB client."""
        self.orthanc.close()
        self.mongo_client.close()


def open_context(config: SyncConfig, stop: threading.Event, max_attempts: int | None = None) -> SyncContext:
    """Create the clients for CONFIG; nothing is contacted yet.

    Raises ConfigError when the Orthanc password cannot be read, and pymongo's
    ConfigurationError when the MongoDB URI has invalid options.
    """
    password = config.orthanc.read_password()
    orthanc = OrthancClient(config.orthanc, password)
    mongo_client = store.connect(config.mongodb)
    database = mongo_client[config.mongodb.database]
    write_concern = store.write_concern_for(config.mongodb.uri)

    return SyncContext(
        config=config,
        orthanc=orthanc,
        mongo_client=mongo_client,
        studies=store.StudyStore(database, config.orthanc.name, write_concern),
        checkpoints=store.CheckpointStore(database, config.orthanc.name, write_concern),
        directory=MachineDirectory(config.machines),
        stop=stop,
        orthanc_outage=Outage(orthanc.label),
        mongodb_outage=Outage(f"MongoDB at {store.redact_uri(config.mongodb.uri)}"),
        max_attempts=max_attempts,
    )
