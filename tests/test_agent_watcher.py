"""Tests of the agent's folder watcher on a real folder with inotify and a real SQLite spool."""

from __future__ import annotations

import os
import threading
import time

from agent_support import make_instance
from dicomfleet.agent.config import AgentConfig, MachineConfig
from dicomfleet.agent.spool import Spool
from dicomfleet.agent.watcher import FolderWatcher

MACHINE = "ct1"


def _watcher(tmp_path, spool: Spool) -> FolderWatcher:
    watch = tmp_path / "export"
    machine = MachineConfig(id=MACHINE, ae_title="CT1", modality="CT", transport="rest",
                            watch_folders=(str(watch),), polling=False, orthanc_url="http://127.0.0.1:8042",
                            orthanc_aet="ORTHANC", orthanc_dicom_port=4242, username=MACHINE,
                            credential=f"orthanc-{MACHINE}")
    config = AgentConfig(path=tmp_path / "agent.toml", spool=tmp_path / "spool.sqlite3",
                         quarantine=tmp_path / "quarantine", status_file=tmp_path / "status.json",
                         rescan_interval_s=600.0, quiet_time_s=2.0, workers=1, machines=(machine,))
    return FolderWatcher(config, spool, lambda: None, threading.Event())


def test_watcher_queues_backlog_before_waiting(tmp_path):
    watch = tmp_path / "export"
    watch.mkdir()
    # Files written a minute ago have settled, so the scan at start may queue them at once.
    written = time.time() - 60
    for number in range(3):
        path = watch / f"slice-{number}.dcm"
        path.write_bytes(make_instance())
        os.utime(path, (written, written))
    spool = Spool(tmp_path / "spool.sqlite3")
    watcher = _watcher(tmp_path, spool)

    queued_at_first_wait = []
    read_events = watcher.inotify.read

    def read_after_counting(timeout=None, read_delay=None):
        queued_at_first_wait.append(spool.counts(MACHINE, 0).queued)
        return read_events(timeout=timeout, read_delay=read_delay)

    watcher.inotify.read = read_after_counting
    try:
        watcher._step()
    finally:
        watcher.inotify.close()
        spool.close()

    assert queued_at_first_wait == [3]
