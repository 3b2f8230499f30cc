"""Write the agent's status file: per machine, what is queued, sent, failed and quarantined.

The file is JSON, replaced atomically (written beside it, synced, renamed) every
few seconds, so a reader never sees half of it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from dicomfleet import __version__
from dicomfleet.agent.config import AgentConfig
from dicomfleet.agent.sender import Sender
from dicomfleet.agent.spool import Spool

log = logging.getLogger(__name__)

INTERVAL_S = 5.0


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def local_day_start(now: float) -> float:
    """Return the epoch seconds of the last local midnight before NOW."""
    moment = datetime.datetime.fromtimestamp(now).astimezone()
    midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight.timestamp()


def _folder_space(folder: str) -> dict:
    try:
        usage = shutil.disk_usage(folder)
    except OSError as error:
        return {"exists": os.path.isdir(folder), "free_bytes": None, "total_bytes": None,
                "error": error.strerror or str(error)}
    return {"exists": True, "free_bytes": usage.free, "total_bytes": usage.total}


def build_status(config: AgentConfig, spool: Spool, sender: Sender, started_at: float,
                 now: float | None = None) -> dict:
    """Return the status document for the agent's current state."""
    now = time.time() if now is None else now
    day_start = local_day_start(now)
    machines = {}
    for machine in config.machines:
        counts = spool.counts(machine.id, day_start)
        activity = sender.activity[machine.id]
        breaker = sender.breakers[machine.id]
        last_success = activity.last_success_at or counts.last_sent_at
        oldest = counts.oldest_pending_created_at

        machines[machine.id] = {
            "ae_title": machine.ae_title,
            "modality": machine.modality,
            "transport": machine.transport,
            "orthanc_url": machine.orthanc_url,
            "state": breaker.describe(),
            "files_queued": counts.queued + counts.sending,
            "files_sent_today": counts.sent_today,
            "files_failed": counts.failed,
            "files_quarantined": counts.quarantined,
            "files_quarantined_today": counts.quarantined_today,
            "last_success_at": _iso(last_success),
            "last_error": activity.last_error,
            "last_error_at": _iso(activity.last_error_at),
            "oldest_queued_age_s": None if oldest is None else round(max(0.0, now - oldest), 1),
            "watch_folders": {folder: _folder_space(folder) for folder in machine.watch_folders},
        }

    return {
        "agent_version": __version__,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "config": str(config.path),
        "started_at": _iso(started_at),
        "updated_at": _iso(now),
        "machines": machines,
    }


def write_status(path: Path, document: dict) -> None:
    """Replace the file PATH with DOCUMENT as JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o640)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
