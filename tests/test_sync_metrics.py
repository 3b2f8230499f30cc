"""Tests of the sync's Prometheus endpoint: a real sync between a real Orthanc and SecantusDB, scraped over HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from metrics_support import scrape, value
from pydicom.uid import generate_uid
from test_sync_support import SyncEnvironment, make_instance, wait_until

from dicomfleet import __version__, localservers, render
from dicomfleet.sync.config import ConfigError, parse_config

SOURCE = "local"


def _sync_environment(folder: Path) -> tuple[SyncEnvironment, int]:
    port = localservers.free_port()
    environment = SyncEnvironment(folder, central={"dicomfleet_sync_metrics_port": port})
    return environment, port


def test_sync_metrics_follow_studies(tmp_path):
    environment, port = _sync_environment(tmp_path)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        environment.start_servers()
        started = time.time()
        environment.start_sync()
        wait_until(lambda: "Reconcile found" in environment.log_text(), 30, "the sync's first reconcile")
        assert f"Serving the sync's Prometheus metrics at {url}." in environment.log_text()

        studies = [generate_uid() for _ in range(2)]
        for study in studies:
            environment.upload(make_instance(study), source_machine="ct1")
        for study in studies:
            environment.wait_for_record(study)

        def caught_up():
            samples = scrape(url)
            if value(samples, "dicomfleet_sync_records_written_total", orthanc=SOURCE) != 2:
                return None
            if value(samples, "dicomfleet_sync_feed_lag_changes", orthanc=SOURCE) != 0:
                return None
            return samples

        samples = wait_until(caught_up, 15, "two records written and no lag in the metrics")
        checkpoint = environment.checkpoints.find_one({"_id": SOURCE})["seq"]

        assert value(samples, "dicomfleet_sync_records_written_total", orthanc=SOURCE) == 2
        assert value(samples, "dicomfleet_sync_feed_checkpoint_seq", orthanc=SOURCE) == checkpoint
        assert value(samples, "dicomfleet_sync_feed_last_seq", orthanc=SOURCE) == checkpoint
        assert value(samples, "dicomfleet_sync_feed_lag_changes", orthanc=SOURCE) == 0
        assert value(samples, "dicomfleet_sync_reconcile_runs_total", orthanc=SOURCE) == 1
        for kind in ("missing", "extra", "differing"):
            assert value(samples, "dicomfleet_sync_reconcile_last_differences", orthanc=SOURCE, kind=kind) == 0
        last_cycle = value(samples, "dicomfleet_sync_last_cycle_timestamp_seconds", orthanc=SOURCE)
        assert started <= last_cycle <= time.time()
        assert value(samples, "dicomfleet_sync_orthanc_up", orthanc=SOURCE) == 1
        assert value(samples, "dicomfleet_sync_mongodb_up", orthanc=SOURCE) == 1
        assert value(samples, "dicomfleet_sync_build_info", orthanc=SOURCE, version=__version__) == 1

        environment.mongo.stop()
        wait_until(lambda: value(scrape(url), "dicomfleet_sync_mongodb_up", orthanc=SOURCE) == 0, 20,
                   "dicomfleet_sync_mongodb_up to fall to 0 after SecantusDB stopped")
        environment.orthanc.stop()
        wait_until(lambda: value(scrape(url), "dicomfleet_sync_orthanc_up", orthanc=SOURCE) == 0, 15,
                   "dicomfleet_sync_orthanc_up to fall to 0 after Orthanc stopped")

        assert environment.stop_sync() == 0
        assert "Stopped serving the sync's Prometheus metrics" in environment.log_text()
    finally:
        environment.close()


def test_sync_template_renders_inventory_port(tmp_path):
    environment, port = _sync_environment(tmp_path)
    server = environment.orthanc.server
    text = render.render_template("sync.toml.j2", render.server_context(environment.site, server,
                                                                         environment.orthanc.secrets))

    assert f'[metrics]\nlisten = "127.0.0.1:{port}"' in text


def test_sync_template_port_zero_turns_metrics_off(tmp_path):
    environment = SyncEnvironment(tmp_path, central={"dicomfleet_sync_metrics_port": 0})
    server = environment.orthanc.server
    text = render.render_template("sync.toml.j2", render.server_context(environment.site, server,
                                                                         environment.orthanc.secrets))

    assert "[metrics]" not in text


SYNC_CONFIG = """
[orthanc]
name = "local"
url = "http://127.0.0.1:8042"
public_url = "http://127.0.0.1:8042"
username = "sync"
credential = "orthanc-sync"

[mongodb]
uri = "mongodb://127.0.0.1:27017/"
database = "dicomfleet"
"""


def test_sync_config_without_metrics_table_is_off(tmp_path):
    config = parse_config(SYNC_CONFIG, tmp_path / "sync.toml")

    assert config.metrics_listen is None


@pytest.mark.parametrize("listen", ["192.0.2.1:9732", "0.0.0.0:9732", "localhost:9732"])
def test_sync_config_rejects_listen(tmp_path, listen):
    path = tmp_path / "sync.toml"
    with pytest.raises(ConfigError) as raised:
        parse_config(SYNC_CONFIG + f'\n[metrics]\nlisten = "{listen}"\n', path)

    assert len(raised.value.problems) == 1
    assert raised.value.problems[0].startswith(
        f"{path}: [metrics] listen: {listen!r} must be a loopback IP address (127.0.0.0/8 or ::1)")
