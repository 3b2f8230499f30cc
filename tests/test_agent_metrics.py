"""Tests of the agent's Prometheus endpoint: a real agent, a real Orthanc, real DICOM files, scraped over HTTP."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from agent_support import MACHINE_ID, PYDICOM_FILES, AgentSite, make_instance, sop_instance_uid, wait_until
from metrics_support import scrape, value

from dicomfleet import __version__, localservers, render
from dicomfleet.agent.config import ConfigError, parse_config
from dicomfleet.inventory import InventoryError, load_site

MINIMAL_CONFIG = """
[agent]
spool = "/var/lib/dicomfleet-agent/spool.sqlite3"
quarantine = "/var/lib/dicomfleet-agent/quarantine"
status_file = "/var/lib/dicomfleet-agent/status.json"

[[machine]]
id = "ct1"
ae_title = "CT1"
modality = "CT"
watch_folders = ["/srv/dicom/ct1"]
orthanc_url = "http://127.0.0.1:8042"
orthanc_aet = "ORTHANC"
orthanc_dicom_port = 4242
username = "ct1"
credential = "orthanc-ct1"
"""

# An agent machine for inventories that are only validated and rendered, never deployed.
INVENTORY_MACHINE = {"name": "ct1", "ansible_host": "127.0.0.1", "dicomfleet_machine_id": "ct1",
                     "dicomfleet_ae_title": "CT1", "dicomfleet_modality": "CT", "dicomfleet_location": "CT room 1",
                     "dicomfleet_ingest": "agent", "dicomfleet_watch_folders": ["/srv/dicom/ct1"]}


@pytest.fixture(scope="module")
def agent_site(tmp_path_factory):
    site = AgentSite(tmp_path_factory.mktemp("agent-metrics"))
    site.orthanc.start()
    yield site
    site.stop_all()


def _start_with_metrics(site: AgentSite, port: int):
    site.config_path = localservers.write_agent_config(site.site, MACHINE_ID, site.folder, site.orthanc.secrets,
                                                       metrics_port=port)
    return site.start_agent(log_level="INFO")


def test_agent_metrics_count_sent_and_quarantined(agent_site):
    agent_site.reset()
    port = localservers.free_port()
    started = time.time()
    agent = _start_with_metrics(agent_site, port)
    agent.wait_for_log(f"Serving the agent's Prometheus metrics at http://127.0.0.1:{port}/metrics")

    files = {f"study/slice-{number}.dcm": make_instance() for number in range(4)}
    for name, data in files.items():
        path = agent_site.watch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    # copy2 keeps the old modification time, so the truncated file counts as finished and is quarantined at once.
    shutil.copy2(PYDICOM_FILES / "MR_truncated.dcm", agent_site.watch / "MR_truncated.dcm")
    agent_site.wait_stored([sop_instance_uid(data) for data in files.values()])

    url = f"http://127.0.0.1:{port}/metrics"
    quarantined = {"machine": MACHINE_ID, "state": "quarantined"}

    def settled():
        samples = scrape(url)
        if value(samples, "dicomfleet_agent_sent_files_total", machine=MACHINE_ID) != 4:
            return None
        if value(samples, "dicomfleet_agent_spool_files", **quarantined) != 1:
            return None
        return samples

    samples = wait_until(settled, timeout=15, message="four sent files and one quarantined file in the metrics")

    assert value(samples, "dicomfleet_agent_sent_files_total", machine=MACHINE_ID) == 4
    assert value(samples, "dicomfleet_agent_sent_bytes_total", machine=MACHINE_ID) == sum(map(len, files.values()))
    assert value(samples, "dicomfleet_agent_sent_files_today", machine=MACHINE_ID) == 4
    assert value(samples, "dicomfleet_agent_spool_files", **quarantined) == 1
    assert value(samples, "dicomfleet_agent_spool_files", machine=MACHINE_ID, state="queued") == 0
    assert value(samples, "dicomfleet_agent_spool_files", machine=MACHINE_ID, state="sending") == 0
    assert value(samples, "dicomfleet_agent_spool_files", machine=MACHINE_ID, state="failed") == 0
    assert value(samples, "dicomfleet_agent_spool_oldest_queued_age_seconds", machine=MACHINE_ID) == 0
    last_success = value(samples, "dicomfleet_agent_last_success_timestamp_seconds", machine=MACHINE_ID)
    assert started <= last_success <= time.time()
    free = value(samples, "dicomfleet_agent_watch_folder_free_bytes", machine=MACHINE_ID,
                 folder=str(agent_site.watch))
    assert free == pytest.approx(shutil.disk_usage(agent_site.watch).free, rel=0.05)
    build = value(samples, "dicomfleet_agent_build_info", machine=MACHINE_ID, version=__version__, transport="rest")
    assert build == 1


def test_agent_metrics_stop_with_agent(agent_site):
    agent_site.reset()
    port = localservers.free_port()
    agent = _start_with_metrics(agent_site, port)
    agent.wait_for_log("Serving the agent's Prometheus metrics")

    assert agent.stop() == 0
    assert "Stopped serving the agent's Prometheus metrics" in agent.log_text()
    with pytest.raises(OSError):
        scrape(f"http://127.0.0.1:{port}/metrics")


def test_agent_metrics_busy_port_keeps_sending(agent_site):
    agent_site.reset()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        agent = _start_with_metrics(agent_site, holder.getsockname()[1])
        agent.wait_for_log("Cannot serve the agent's Prometheus metrics")

        data = make_instance()
        (agent_site.watch / "one.dcm").write_bytes(data)
        agent_site.wait_stored([sop_instance_uid(data)])
        assert agent.process.poll() is None


def test_local_agent_config_has_no_metrics_by_default(agent_site, tmp_path):
    path = localservers.write_agent_config(agent_site.site, MACHINE_ID, tmp_path, agent_site.orthanc.secrets)

    assert "[metrics]" not in path.read_text(encoding="utf-8")


def test_agent_template_renders_inventory_port(agent_site):
    site = agent_site.site
    machines = [machine for machine in site.machines.values() if machine.agent_host == MACHINE_ID]
    text = render.render_template("agent.toml.j2", render.agent_context(site, MACHINE_ID, machines))

    assert '[metrics]\nlisten = "127.0.0.1:9731"' in text


@pytest.mark.parametrize("listen, expected", [
    ("127.0.0.1:9731", "127.0.0.1:9731"),
    ("127.0.0.53:9731", "127.0.0.53:9731"),
    ("[::1]:9731", "[::1]:9731"),
    ("127.0.0.1:0", None),
])
def test_agent_config_accepts_loopback_listen(tmp_path, listen, expected):
    config = parse_config(MINIMAL_CONFIG + f'\n[metrics]\nlisten = "{listen}"\n', tmp_path / "agent.toml")

    assert (None if config.metrics_listen is None else str(config.metrics_listen)) == expected


@pytest.mark.parametrize("listen", ["192.0.2.1:9731", "0.0.0.0:9731", "[::]:9731", "localhost:9731",
                                    "127.0.0.1", "127.0.0.1:70000", "::1:9731"])
def test_agent_config_rejects_listen(tmp_path, listen):
    path = tmp_path / "agent.toml"
    with pytest.raises(ConfigError) as raised:
        parse_config(MINIMAL_CONFIG + f'\n[metrics]\nlisten = "{listen}"\n', path)

    message = raised.value.problems[0]
    assert len(raised.value.problems) == 1
    assert message.startswith(f"{path}: [metrics]: listen = {listen!r}")


def test_agent_rejects_public_listen_at_start(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL_CONFIG + '\n[metrics]\nlisten = "192.0.2.1:9731"\n', encoding="utf-8")

    result = subprocess.run([sys.executable, "-m", "dicomfleet", "agent", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, env={**os.environ})

    assert result.returncode == 2
    assert "[metrics]: listen = '192.0.2.1:9731' must be a loopback IP address (127.0.0.0/8 or ::1)" in result.stderr


@pytest.mark.parametrize("variable, where", [("dicomfleet_agent_metrics_port", "machine"),
                                             ("dicomfleet_sync_metrics_port", "central")])
def test_inventory_rejects_metrics_port(tmp_path, variable, where):
    machine = dict(INVENTORY_MACHINE)
    central = {}
    if where == "machine":
        machine[variable] = 70000
    else:
        central[variable] = 70000
    inventory = localservers.write_local_inventory(tmp_path, [machine], central=central)

    with pytest.raises(InventoryError) as raised:
        load_site(inventory)

    problems = raised.value.problems
    assert len(problems) == 1
    assert f"{variable}: 70000 is outside the TCP port range 1 to 65535 (0 turns it off)" in problems[0]


def test_inventory_accepts_metrics_port_zero(tmp_path):
    machine = {**INVENTORY_MACHINE, "dicomfleet_agent_metrics_port": 0}
    site = load_site(localservers.write_local_inventory(tmp_path, [machine]))
    text = render.render_template("agent.toml.j2", render.agent_context(site, "ct1", list(site.machines.values())))

    assert "[metrics]" not in text
