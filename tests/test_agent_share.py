"""Tests of the share ingest path: one agent on a file server polls a subfolder per share machine.

The inventory names the file server in each machine's ``dicomfleet_share_host``; the
rendered agent config carries one [[machine]] per share machine, each with its own
Orthanc user, and the agent runs against a real Orthanc.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import requests
import yaml

from agent_support import AgentProcess, make_instance, sop_instance_uid, wait_until
from dicomfleet import credentials, localservers, render
from dicomfleet.inventory import InventoryError, load_site


def _share_document(share_root: Path, central: dict | None = None) -> dict:
    """Return an inventory with a central host, the file server fs1 and two share machines."""
    def machine(machine_id: str, ae_title: str, address: str) -> dict:
        return {
            "ansible_host": address,
            "dicomfleet_machine_id": machine_id,
            "dicomfleet_ae_title": ae_title,
            "dicomfleet_modality": "CT",
            "dicomfleet_location": f"Radiology, {machine_id}",
            "dicomfleet_ingest": "share",
            "dicomfleet_share_host": "fs1",
            "dicomfleet_watch_folders": [str(share_root / machine_id)],
        }

    central_vars = {"ansible_host": "127.0.0.1", "dicomfleet_orthanc_aet": "ORTHANC", "dicomfleet_mongodb_uri": ""}
    central_vars.update(central or {})
    return {
        "all": {
            "vars": {"dicomfleet_site": "share"},
            "children": {
                "central": {"hosts": {"central": central_vars}},
                "fileservers": {"hosts": {"fs1": {"ansible_host": "127.0.0.1",
                                                  "dicomfleet_agent_quiet_time_s": 0.5,
                                                  "dicomfleet_agent_workers": 2}}},
                "scanners": {"hosts": {"ct2": machine("ct2", "CT_ROOM2", "127.0.0.2"),
                                       "ct3": machine("ct3", "CT_ROOM3", "127.0.0.3")}},
            },
        }
    }


def _write(folder: Path, document: dict) -> Path:
    path = folder / "inventory.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def _problems(folder: Path, document: dict) -> list[str]:
    with pytest.raises(InventoryError) as caught:
        load_site(_write(folder, document))
    return caught.value.problems


def _machines(document: dict) -> dict:
    return document["all"]["children"]["scanners"]["hosts"]


def test_share_host_plan_serves_both_machines(tmp_path):
    site = load_site(_write(tmp_path, _share_document(Path("/srv/share"))))
    secrets = credentials.ensure_secrets(site, tmp_path / "secrets")

    plan = render.plan_host(site, "fs1", secrets)
    agent_toml = next(f for f in plan.files if f.path == "/etc/dicomfleet/agent.toml")
    config = tomllib.loads(agent_toml.content)
    paths = {f.path for f in plan.files}

    assert render.ROLE_AGENT in plan.roles
    assert [m["id"] for m in config["machine"]] == ["ct2", "ct3"]
    assert [m["polling"] for m in config["machine"]] == [True, True]
    assert [m["watch_folders"] for m in config["machine"]] == [["/srv/share/ct2"], ["/srv/share/ct3"]]
    assert [m["username"] for m in config["machine"]] == ["ct2", "ct3"]
    assert "/etc/dicomfleet/credentials/orthanc-ct2.password" in paths
    assert "/etc/dicomfleet/credentials/orthanc-ct3.password" in paths


def test_share_machine_hosts_get_no_agent(tmp_path):
    site = load_site(_write(tmp_path, _share_document(Path("/srv/share"))))
    secrets = credentials.ensure_secrets(site, tmp_path / "secrets")

    assert render.plan_host(site, "ct2", secrets).roles == []
    assert "fs1" in render.deployed_hosts(site)
    assert "ct2" not in render.deployed_hosts(site)


def test_share_cstore_registered_with_fileserver_address(tmp_path):
    document = _share_document(Path("/srv/share"))
    _machines(document)["ct2"]["dicomfleet_transport"] = "cstore"
    site = load_site(_write(tmp_path, document))
    secrets = credentials.ensure_secrets(site, tmp_path / "secrets")

    plan = render.plan_host(site, "central", secrets)
    orthanc_json = next(f for f in plan.files if f.path == "/etc/orthanc/orthanc.json")
    modalities = json.loads(orthanc_json.content)["DicomModalities"]

    # The file server's agent sends the C-STOREs, so Orthanc must accept CT_ROOM2 from its address.
    assert modalities["ct2"]["AET"] == "CT_ROOM2"
    assert modalities["ct2"]["Host"] == "127.0.0.1"
    assert "ct3" not in modalities


def test_sync_names_share_cstore_machine(tmp_path):
    document = _share_document(Path("/srv/share"))
    _machines(document)["ct2"]["dicomfleet_transport"] = "cstore"
    site = load_site(_write(tmp_path, document))
    secrets = credentials.ensure_secrets(site, tmp_path / "secrets")
    directory = render.sync_machine_directory(site, site.servers["central"], secrets)

    # Orthanc records the file server's address for the C-STOREs its agent sends for ct2.
    metadata = {"RemoteAET": "CT_ROOM2", "RemoteIP": "127.0.0.1", "Origin": "DicomProtocol"}
    assert directory.resolve(metadata).machine_id == "ct2"


def test_share_host_missing_rejected(tmp_path):
    document = _share_document(Path("/srv/share"))
    del _machines(document)["ct2"]["dicomfleet_share_host"]

    problems = _problems(tmp_path, document)

    assert len(problems) == 1
    assert "host ct2: dicomfleet_share_host: missing" in problems[0]


def test_share_host_unknown_rejected(tmp_path):
    document = _share_document(Path("/srv/share"))
    _machines(document)["ct2"]["dicomfleet_share_host"] = "fs9"

    problems = _problems(tmp_path, document)

    assert len(problems) == 1
    assert "'fs9' is not a host of the inventory" in problems[0]


def test_share_host_outside_group_rejected(tmp_path):
    document = _share_document(Path("/srv/share"))
    _machines(document)["ct2"]["dicomfleet_share_host"] = "central"

    problems = _problems(tmp_path, document)

    assert len(problems) == 1
    assert "'central' is not in the group 'fileservers'" in problems[0]


@pytest.mark.parametrize("folder", ["/srv/share/ct2", "/srv/share/ct2/", "/srv/share/ct2/sub", "/srv/share"])
def test_share_folder_watched_twice_rejected(tmp_path, folder):
    document = _share_document(Path("/srv/share"))
    _machines(document)["ct3"]["dicomfleet_watch_folders"] = [folder]

    problems = _problems(tmp_path, document)

    assert len(problems) == 1
    assert "host ct3: dicomfleet_watch_folders:" in problems[0]
    assert "overlaps the watch folder '/srv/share/ct2' of host ct2 on the same agent host fs1" in problems[0]


def test_archive_folder_inside_watch_folder_rejected(tmp_path):
    document = _share_document(Path("/srv/share"))
    _machines(document)["ct2"]["dicomfleet_after_send"] = "archive"
    _machines(document)["ct2"]["dicomfleet_archive_folder"] = "/srv/share/ct2/done"

    problems = _problems(tmp_path, document)

    assert len(problems) == 1
    assert "host ct2: dicomfleet_archive_folder: '/srv/share/ct2/done' overlaps a watch folder" in problems[0]


def _write_share_agent_config(site, folder: Path, secrets: credentials.SiteSecrets) -> Path:
    """Render fs1's agent.toml for a local run: state under FOLDER, passwords from files."""
    machines = [m for m in site.machines.values() if m.agent_host == "fs1"]
    text = render.render_template("agent.toml.j2", render.agent_context(site, "fs1", machines))
    text = text.replace("/var/lib/dicomfleet-agent", str(folder / "agent-state"))

    lines = []
    for line in text.splitlines():
        lines.append(line)
        if line.startswith("credential = "):
            name = json.loads(line.split("=", 1)[1])
            secret_file = folder / "agent-secrets" / name
            secret_file.parent.mkdir(parents=True, exist_ok=True)
            secret_file.write_text(secrets.orthanc_password(name.removeprefix("orthanc-")) + "\n")
            secret_file.chmod(0o600)
            lines.append(f"password_file = {json.dumps(str(secret_file))}")
    path = folder / "agent-fs1.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_share_agent_tags_each_machine(tmp_path):
    share = tmp_path / "share"
    for machine_id in ("ct2", "ct3"):
        (share / machine_id).mkdir(parents=True)
    central = {
        "dicomfleet_orthanc_http_port": localservers.free_port(),
        "dicomfleet_orthanc_dicom_port": localservers.free_port(),
        "dicomfleet_orthanc_storage_directory": str(tmp_path / "orthanc-storage"),
        "dicomfleet_orthanc_plugins": [],
        # This Orthanc runs without nginx in front, so the agent sends plain HTTP.
        "dicomfleet_tls": False,
    }
    site = load_site(_write(tmp_path, _share_document(share, central)))
    orthanc = localservers.OrthancProcess(site, tmp_path).start()
    agent = None
    try:
        config = _write_share_agent_config(site, tmp_path, orthanc.secrets)
        agent = AgentProcess(config, tmp_path / "agent.log")
        agent.wait_for_log("Watching ", count=2, timeout=20)
        files = {machine_id: [make_instance() for _ in range(2)] for machine_id in ("ct2", "ct3")}
        for machine_id, datas in files.items():
            for number, data in enumerate(datas):
                (share / machine_id / f"slice-{number}.dcm").write_bytes(data)

        wait_until(lambda: orthanc.get("/statistics")["CountInstances"] >= 4, 30, interval=0.2,
                   message="4 instances in Orthanc")
        agent.wait_for_log("Stored file", 4)

        for machine_id, datas in files.items():
            for data in datas:
                (match,) = [item["ID"] for item in _lookup(orthanc, sop_instance_uid(data))]
                metadata = orthanc.get(f"/instances/{match}/metadata?expand")
                assert metadata["HttpUsername"] == machine_id
        assert orthanc.get("/statistics")["CountInstances"] == 4
        assert agent.log_text().count("(polled)") == 2
    finally:
        if agent is not None:
            agent.stop()
        orthanc.stop()


def _lookup(orthanc: localservers.OrthancProcess, sop_uid: str) -> list[dict]:
    answer = requests.post(orthanc.url + "/tools/lookup", data=sop_uid, auth=orthanc.admin_auth, timeout=10)
    answer.raise_for_status()
    return [item for item in answer.json() if item["Type"] == "Instance"]
