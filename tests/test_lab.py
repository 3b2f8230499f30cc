"""Tests of the lab: real systemd-nspawn hosts booted from small inventories on 127.0.10.200-209.

Booting tests need root; each keeps its lab state in tmp_path and stops what it booted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import paramiko
import pytest
import yaml

from dicomfleet import lab
from dicomfleet.inventory import load_site

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn lab hosts need root")


def write_inventory(folder: Path, site: str, hosts: dict[str, str]) -> Path:
    """Write an inventory of SITE whose first host is central and the others agent machines.

    HOSTS maps inventory host names to their ansible_host addresses.
    """
    names = list(hosts)
    scanners = {}
    for index, name in enumerate(names[1:], start=1):
        scanners[name] = {
            "ansible_host": hosts[name],
            "dicomfleet_machine_id": f"m{index}",
            "dicomfleet_ae_title": f"SCANNER{index}",
            "dicomfleet_modality": "CT",
            "dicomfleet_location": f"Test room {index}",
            "dicomfleet_ingest": "agent",
            "dicomfleet_watch_folders": ["/srv/dicom/export"],
        }

    document = {
        "all": {
            "vars": {"dicomfleet_site": site, "dicomfleet_lab": True},
            "children": {
                "central": {"hosts": {names[0]: {"ansible_host": hosts[names[0]]}}},
                "scanners": {"hosts": scanners},
            },
        }
    }
    path = folder / f"{site}.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def recorded_pid(site: str, host: str) -> int:
    """Return the PID that the state file of SITE's HOST records."""
    state = json.loads((lab.state_root() / site / host / "state.json").read_text())
    return state["pid"]


@pytest.fixture
def state_folder(tmp_path, monkeypatch):
    """Keep this test's lab state in its own folder, and stop whatever it boots."""
    folder = tmp_path / "lab-state"
    monkeypatch.setenv("DICOMFLEET_LAB_STATE", str(folder))
    yield folder
    lab.down(None)


@pytest.fixture
def booted(state_folder, tmp_path):
    """One running lab host: site labtest, host central on 127.0.10.200."""
    inventory = write_inventory(tmp_path, "labtest", {"central": "127.0.10.200"})
    site = load_site(inventory)
    addresses = lab.up(site)
    return {"site": site, "inventory": inventory, "addresses": addresses,
            "pid": recorded_pid("labtest", "central")}


@pytest.mark.lab
@needs_root
def test_up_boots_host_answering_over_ssh(booted):
    address = booted["addresses"]["central"]

    state = lab.ssh(address, "systemctl is-system-running", check=False).stdout.strip()
    hostname = lab.ssh(address, "hostname").stdout.strip()

    assert address == "127.0.10.200"
    assert state in ("running", "degraded")
    assert hostname == "central"


@pytest.mark.lab
@needs_root
def test_up_again_keeps_running_host(booted):
    addresses = lab.up(booted["site"])

    assert addresses == {"central": "127.0.10.200"}
    assert recorded_pid("labtest", "central") == booted["pid"]
    assert lab.status(booted["site"])[0].pid == booted["pid"]


@pytest.mark.lab
@needs_root
def test_known_hosts_passes_strict_check_in_paramiko(booted):
    client = paramiko.SSHClient()
    client.load_host_keys(str(lab.known_hosts_path()))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect("127.0.10.200", username="root", key_filename=str(lab.key_path()),
                   look_for_keys=False, allow_agent=False, timeout=10)
    try:
        _, stdout, _ = client.exec_command("cat /etc/ssh/sshd_config.d/listen.conf")
        listen = stdout.read().decode().strip()
    finally:
        client.close()

    assert listen == "ListenAddress 127.0.10.200"


@pytest.mark.lab
@needs_root
def test_ssh_raises_on_failing_command(booted):
    with pytest.raises(subprocess.CalledProcessError) as raised:
        lab.ssh("127.0.10.200", "exit 3")

    assert raised.value.returncode == 3
    assert "127.0.10.200" in str(raised.value)


@pytest.mark.lab
@needs_root
def test_status_command_prints_running_host(booted, capsys):
    code = lab.main(["status", str(booted["inventory"])])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]

    assert code == 0
    assert rows == [["labtest", "central", "127.0.10.200", "running", str(booted["pid"])]]


@pytest.mark.lab
@needs_root
def test_up_rejects_address_of_other_site(booted, tmp_path):
    inventory = write_inventory(tmp_path, "labclash", {"central": "127.0.10.200"})

    with pytest.raises(lab.LabError) as raised:
        lab.up(load_site(inventory))

    message = str(raised.value)
    assert "site labclash" in message
    assert "site labtest" in message
    assert "127.0.10.200" in message
    assert not (lab.state_root() / "labclash").exists()


@pytest.mark.lab
@needs_root
def test_up_rejects_address_outside_lab_network(state_folder, tmp_path, capsys):
    # 192.0.2.10 is a documentation address; the lab rejects it before contacting anything.
    inventory = write_inventory(tmp_path, "laboutside",
                                {"central": "127.0.10.201", "scanner": "192.0.2.10"})

    with pytest.raises(lab.LabError) as raised:
        lab.up(load_site(inventory))
    code = lab.main(["up", str(inventory)])
    error_output = capsys.readouterr().err

    assert "host scanner" in str(raised.value)
    assert "192.0.2.10" in str(raised.value)
    assert str(inventory) in str(raised.value)
    assert code == 1
    assert "host scanner: ansible_host: 192.0.2.10 is outside 127.0.10.0/24" in error_output
    assert not (state_folder / "laboutside").exists()
    assert not lab.accepts_ssh("127.0.10.201")


@pytest.mark.lab
@needs_root
def test_up_rejects_address_with_other_listener(state_folder, tmp_path):
    inventory = write_inventory(tmp_path, "lablistener", {"central": "127.0.10.209"})
    with socket.create_server(("127.0.10.209", 22)):
        with pytest.raises(lab.LabError) as raised:
            lab.up(load_site(inventory))

    assert "already accepts SSH connections on 127.0.10.209" in str(raised.value)
    assert not (state_folder / "lablistener" / "central" / "state.json").exists()


@pytest.mark.lab
@needs_root
def test_down_stops_every_host_it_started(state_folder, tmp_path):
    first = load_site(write_inventory(tmp_path, "labdown1", {"central": "127.0.10.201"}))
    second = load_site(write_inventory(tmp_path, "labdown2", {"central": "127.0.10.202"}))
    lab.up(first)
    lab.up(second)
    pids = [recorded_pid("labdown1", "central"), recorded_pid("labdown2", "central")]

    code = lab.main(["down"])

    assert code == 0
    for pid, address, site in zip(pids, ["127.0.10.201", "127.0.10.202"], ["labdown1", "labdown2"]):
        assert not Path(f"/proc/{pid}").exists()
        assert not lab.accepts_ssh(address)
        assert lab.ssh(address, "true", check=False).returncode == 255
        assert not (state_folder / site / "central" / "state.json").exists()


@pytest.mark.lab
@needs_root
def test_down_with_inventory_leaves_other_sites(state_folder, tmp_path):
    other_site = load_site(write_inventory(tmp_path, "labkept", {"central": "127.0.10.203"}))
    stopped_site = load_site(write_inventory(tmp_path, "labstopped", {"central": "127.0.10.204"}))
    lab.up(other_site)
    lab.up(stopped_site)

    names = lab.down(stopped_site)
    rows = {row.site: row for row in lab.status(None)}

    assert names == ["labstopped/central"]
    assert rows["labkept"].running
    assert not rows["labstopped"].running
    assert lab.accepts_ssh("127.0.10.203")
    assert not lab.accepts_ssh("127.0.10.204")


@pytest.mark.lab
@needs_root
def test_fresh_up_removes_earlier_file(state_folder, tmp_path):
    site = load_site(write_inventory(tmp_path, "labfresh", {"central": "127.0.10.205"}))
    lab.up(site)
    first_pid = recorded_pid("labfresh", "central")
    lab.ssh("127.0.10.205", "echo kept > /root/marker")

    lab.down(site)
    lab.up(site)
    after_restart = lab.ssh("127.0.10.205", "cat /root/marker", check=False)
    lab.up(site, fresh=True)
    after_fresh = lab.ssh("127.0.10.205", "test -e /root/marker", check=False)

    assert after_restart.stdout == "kept\n"
    assert after_fresh.returncode == 1
    assert recorded_pid("labfresh", "central") != first_pid


@pytest.mark.lab
@needs_root
def test_stale_state_file_is_removed(state_folder):
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead_pid = finished.pid
    host = lab.LabHost(site="labstale", host="central", address="127.0.10.206")
    host.folder.mkdir(parents=True)
    host.state_path.write_text(json.dumps({
        "site": host.site, "host": host.host, "address": host.address,
        "machine": host.machine, "pid": dead_pid, "inventory": "", "started_at": 0.0,
    }))

    rows = lab.status(None)
    names = lab.down(None)

    assert [(row.host, row.running) for row in rows] == [("central", False)]
    assert names == []
    assert not host.state_path.exists()


def test_state_of_unrelated_process_is_not_trusted(state_folder):
    # This test's own PID is alive but is no systemd-nspawn process, so the lab must not signal it.
    host = lab.LabHost(site="labpid", host="central", address="127.0.10.207")
    host.folder.mkdir(parents=True)
    host.state_path.write_text(json.dumps({
        "site": host.site, "host": host.host, "address": host.address,
        "machine": host.machine, "pid": os.getpid(), "inventory": "", "started_at": 0.0,
    }))

    state = lab.running_state(host)

    assert state is None
    assert not host.state_path.exists()


def test_lab_hosts_rejects_shared_address(tmp_path):
    inventory = write_inventory(tmp_path, "labshared", {"central": "127.0.10.208", "scanner": "127.0.10.208"})

    with pytest.raises(lab.LabError) as raised:
        lab.lab_hosts(load_site(inventory))

    assert "host scanner" in str(raised.value)
    assert "also the address of host central" in str(raised.value)


def test_lab_hosts_rejects_host_name_address(tmp_path):
    inventory = write_inventory(tmp_path, "labname", {"central": "central.example.org"})

    with pytest.raises(lab.LabError) as raised:
        lab.lab_hosts(load_site(inventory))

    assert "'central.example.org' is not an IP address" in str(raised.value)


def test_ssh_rejects_address_outside_lab_network():
    with pytest.raises(lab.LabError) as raised:
        lab.ssh("192.0.2.10", "true")

    assert "192.0.2.10 is outside 127.0.10.0/24" in str(raised.value)


def test_apt_mirror_reads_deb822_sources(tmp_path, monkeypatch):
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "disabled.sources").write_text(
        "Types: deb\nURIs: http://disabled.invalid/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n")
    (parts / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    monkeypatch.setattr(lab, "APT_SOURCES_LIST", tmp_path / "sources.list")
    monkeypatch.setattr(lab, "APT_SOURCES_PARTS", parts)

    assert lab.apt_mirror() == "http://mirror.invalid/debian"


def test_apt_mirror_reads_one_line_sources(tmp_path, monkeypatch):
    sources = tmp_path / "sources.list"
    sources.write_text("# deb http://old.invalid/debian bookworm main\n"
                       "deb http://security.invalid/debian-security bookworm-security main\n"
                       "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.invalid/debian bookworm main\n")
    monkeypatch.setattr(lab, "APT_SOURCES_LIST", sources)
    monkeypatch.setattr(lab, "APT_SOURCES_PARTS", tmp_path / "missing")

    assert lab.apt_mirror() == "http://mirror.invalid/debian"


def test_apt_mirror_without_bookworm_source_raises(tmp_path, monkeypatch):
    sources = tmp_path / "sources.list"
    sources.write_text("deb http://mirror.invalid/debian trixie main\n")
    monkeypatch.setattr(lab, "APT_SOURCES_LIST", sources)
    monkeypatch.setattr(lab, "APT_SOURCES_PARTS", tmp_path / "missing")

    with pytest.raises(lab.LabError) as raised:
        lab.apt_mirror()

    assert str(sources) in str(raised.value)
