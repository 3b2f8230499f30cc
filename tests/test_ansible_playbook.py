"""Tests of the Ansible roles and playbook that contact no host: validation, plans, vault and lint.

Hosts in these inventories sit on unused lab addresses; every task that runs
here is a controller task, and the invalid-inventory test proves no connection.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from dicomfleet import credentials, render
from dicomfleet.inventory import load_site

from test_ansible_support import (
    PLAN_DUMP_PLAYBOOK,
    ROOT,
    VENV_BIN,
    ansible_env,
    fake_wheelhouse,
    load_plan_action,
    run_playbook,
    write_site,
)

CENTRAL = "127.0.10.157"
SCANNER = "127.0.10.156"

plan_action = load_plan_action()


@pytest.fixture
def site_file(tmp_path) -> Path:
    return write_site(tmp_path / "inventory" / "unit.yml", "ansibleunit", CENTRAL, {"ct1": SCANNER},
                      dicom_machines={"us1": "127.0.10.155"}, dicomfleet_orthanc_http_port=8157)


@pytest.fixture
def plans(site_file, tmp_path):
    """Return each deployed host's render plan and the roles' split of it."""
    site = load_site(site_file)
    secrets = credentials.ensure_secrets(site, tmp_path / "secrets")
    result = {}
    for host in render.deployed_hosts(site):
        plan = render.plan_host(site, host, secrets)
        result[host] = (plan, plan_action.split_plan(plan))
    return result


def dump_plans(inventory: Path | list[Path], tmp_path: Path, *arguments: str,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the plan-dump playbook on INVENTORY; plans land in TMP_PATH/plans/HOST.json."""
    playbook = tmp_path / "dump-plans.yml"
    playbook.write_text(PLAN_DUMP_PLAYBOOK, encoding="utf-8")
    (tmp_path / "plans").mkdir(exist_ok=True)
    wheels = fake_wheelhouse(tmp_path / "wheels")
    return run_playbook(inventory, "-e", f"plan_folder={tmp_path / 'plans'}",
                        "-e", f"dicomfleet_common_wheelhouse={wheels}", *arguments,
                        playbook=playbook, env=env)


# Splitting a plan among the roles ---------------------------------------------------


def test_split_plan_keeps_every_file(plans):
    for host, (plan, parts) in plans.items():
        split_paths = sorted(f["path"] for part in parts.values() for f in part["files"])
        assert split_paths == sorted(f.path for f in plan.files), host


def test_split_plan_keeps_every_service_package_and_user(plans):
    for host, (plan, parts) in plans.items():
        assert sorted(u for part in parts.values() for u in part["services"]) == sorted(plan.services), host
        assert sorted(p for part in parts.values() for p in part["packages"]) == sorted(plan.apt_packages), host
        assert sorted(u for part in parts.values() for u in part["users"]) == sorted(plan.users), host


def test_split_plan_keeps_every_folder_removal_and_command(plans):
    for host, (plan, parts) in plans.items():
        folders = sorted(d["path"] for part in parts.values() for d in part["directories"])
        removed = sorted(r["path"] for part in parts.values() for r in part["removed_paths"])
        commands = [c["name"] for part in parts.values() for c in part["commands"]]
        assert folders == sorted(d.path for d in plan.directories), host
        assert removed == sorted(r.path for r in plan.removed_paths), host
        assert commands == [c.name for c in plan.commands], host


def test_split_plan_gives_orthanc_role_its_files(plans):
    _, parts = plans["central"]
    orthanc_paths = {f["path"] for f in parts["orthanc"]["files"]}

    assert "/etc/orthanc/orthanc.json" in orthanc_paths
    assert "/etc/orthanc/credentials.json" in orthanc_paths
    assert parts["orthanc"]["services"] == ["orthanc.service"]
    assert parts["orthanc"]["packages"] == ["orthanc"]


def test_split_plan_gives_agent_role_watch_folder(plans):
    _, parts = plans["ct1"]

    assert [d["path"] for d in parts["agent"]["directories"]] == ["/srv/dicom/export"]
    assert parts["agent"]["users"] == [render.AGENT_USER]
    assert parts["agent"]["services"] == ["dicomfleet-agent.service"]
    assert parts["orthanc"]["present"] is False


def test_split_plan_keeps_root_folders_in_common_role(plans):
    _, parts = plans["ct1"]
    common = {d["path"] for d in parts["common"]["directories"]}

    assert render.CREDENTIALS_DIR in common
    assert all(d["owner"] == "root" and d["group"] == "root" for d in parts["common"]["directories"])


def test_parent_folders_skip_planned_folders():
    files = [
        {"path": "/etc/dicomfleet/agent.toml", "owner": "root", "group": "root"},
        {"path": "/etc/systemd/system/orthanc.service.d/hardening.conf", "owner": "root", "group": "root"},
        {"path": "/etc/postgresql/15/main/pg_hba.conf", "owner": "postgres", "group": "postgres"},
    ]

    parents = plan_action.parent_folders(files, {"/etc/dicomfleet"})

    assert [p["path"] for p in parents] == ["/etc/postgresql/15/main", "/etc/systemd/system/orthanc.service.d"]
    assert parents[0]["owner"] == "postgres"
    assert parents[1]["mode"] == "0755"


def test_check_plan_fields_rejects_unknown_field():
    import dataclasses

    @dataclasses.dataclass
    class GrownPlan(render.HostPlan):
        firmware_updates: list = dataclasses.field(default_factory=list)

    plan = GrownPlan(host="ct1", address=SCANNER, roles=[], firmware_updates=["scanner-v2"])

    with pytest.raises(plan_action.PlanError) as raised:
        plan_action.check_plan_fields(plan)

    assert "host ct1 has firmware_updates" in str(raised.value)


# Inventory sources -------------------------------------------------------------------


def test_site_files_in_folder_skip_other_inventories(site_file, tmp_path):
    folder = site_file.parent
    (folder / "ansible_inventory.yml").write_text("all:\n  vars:\n    molecule_file: x\n", encoding="utf-8")
    (folder / "group_vars").mkdir()
    (folder / "group_vars" / "all.yml").write_text("dicomfleet_common_wheelhouse: /x\n", encoding="utf-8")

    files = plan_action.site_files([str(folder), "localhost,"])

    assert files == [site_file]


def test_load_sites_rejects_host_in_two_files(site_file, tmp_path):
    other = write_site(tmp_path / "other" / "unit.yml", "ansibleother", "127.0.10.154", {"ct1": SCANNER})

    with pytest.raises(plan_action.InventoryError) as raised:
        plan_action.load_sites([str(site_file), str(other)])

    assert f"{other}: host ct1 is also a deployed host of {site_file}; give every host one inventory file." \
        in raised.value.problems


def test_load_sites_without_inventory_names_sources(tmp_path):
    with pytest.raises(plan_action.InventoryError) as raised:
        plan_action.load_sites(["localhost,"])

    assert "No dicomfleet inventory was found among the inventory sources localhost," in raised.value.problems[0]


# The playbook on the controller ----------------------------------------------------------


def test_invalid_inventory_fails_like_pyinfra_before_host_play(site_file, tmp_path):
    document = yaml.safe_load(site_file.read_text())
    document["all"]["children"]["scanners"]["hosts"]["ct1"]["dicomfleet_ae_title"] = "bad\\title"
    document["all"]["children"]["scanners"]["hosts"]["ct1"]["dicomfleet_watch_folders"] = ["relative/export"]
    invalid = tmp_path / "invalid.yml"
    invalid.write_text(yaml.safe_dump(document), encoding="utf-8")

    pyinfra = subprocess.run([str(VENV_BIN / "dicomfleet"), "deploy", str(invalid)],
                             capture_output=True, text=True, timeout=120)
    with socket.create_server((CENTRAL, 22)) as listener:
        listener.settimeout(0.2)
        ansible = run_playbook(invalid)
        try:
            listener.accept()
            contacted = True
        except socket.timeout:
            contacted = False

    problems = [line for line in pyinfra.stderr.splitlines() if line.startswith(str(invalid))]
    assert pyinfra.returncode == 1
    assert len(problems) == 2
    assert ansible.returncode == 2
    for line in problems + ["Nothing was deployed: fix the inventory and run the deploy again."]:
        assert line in ansible.stdout
    assert "PLAY [Deploy dicomfleet on the hosts of the inventory.]" not in ansible.stdout
    assert contacted is False


def test_plan_holds_rendered_file_bytes(site_file, tmp_path):
    secrets_dir = tmp_path / "secrets"
    result = dump_plans(site_file, tmp_path, env=ansible_env(DICOMFLEET_SECRETS_DIR=str(secrets_dir)))
    site = load_site(site_file)
    expected = render.plan_host(site, "central", credentials.existing_secrets(site, secrets_dir / site.name))

    plan = json.loads((tmp_path / "plans" / "central.json").read_text())
    contents = {f["path"]: f["content"] for part in plan["components"].values() for f in part["files"]}

    assert result.returncode == 0, result.stdout[-3000:]
    assert contents == {f.path: f.content for f in expected.files}
    assert not (tmp_path / "plans" / "us1.json").exists()


def test_inventory_folder_source_is_read(site_file, tmp_path):
    (site_file.parent / "ansible_inventory.yml").write_text("all:\n  vars:\n    molecule_file: x\n", encoding="utf-8")

    result = dump_plans(site_file.parent, tmp_path,
                        env=ansible_env(DICOMFLEET_SECRETS_DIR=str(tmp_path / "secrets")))
    plan = json.loads((tmp_path / "plans" / "ct1.json").read_text())

    assert result.returncode == 0, result.stdout[-3000:]
    assert plan["site"] == "ansibleunit"
    assert plan["components"]["agent"]["services"] == ["dicomfleet-agent.service"]


# Secrets kept encrypted with ansible-vault -----------------------------------------------


@pytest.fixture
def vault_site(site_file, tmp_path):
    """SITE_FILE's secrets generated in TMP_PATH/secrets, the sync's password encrypted with ansible-vault."""
    secrets_dir = tmp_path / "secrets"
    site = load_site(site_file)
    secrets = credentials.ensure_secrets(site, secrets_dir / site.name)
    for host in render.deployed_hosts(site):
        render.plan_host(site, host, secrets)

    secret_file = secrets_dir / site.name / f"orthanc-{credentials.SYNC_USER}.password"
    plain = secret_file.read_text().strip()
    password_file = tmp_path / "vault-password"
    password_file.write_text("correct horse battery staple\n")
    encrypted = subprocess.run([str(VENV_BIN / "ansible-vault"), "encrypt", "--vault-password-file",
                                str(password_file), str(secret_file)],
                               env=ansible_env(), capture_output=True, text=True, timeout=60)
    assert encrypted.returncode == 0, encrypted.stderr
    return {"secrets_dir": secrets_dir, "secret_file": secret_file, "plain": plain,
            "password_file": password_file}


def test_vault_encrypted_secret_is_decrypted(site_file, tmp_path, vault_site):
    result = dump_plans(site_file, tmp_path, "-v", "--vault-password-file", str(vault_site["password_file"]),
                        env=ansible_env(DICOMFLEET_SECRETS_DIR=str(vault_site["secrets_dir"])))
    plan = json.loads((tmp_path / "plans" / "central.json").read_text())
    files = {f["path"]: f for f in plan["components"]["sync"]["files"]}

    assert result.returncode == 0, result.stdout[-3000:]
    assert vault_site["secret_file"].read_text().startswith("$ANSIBLE_VAULT;")
    assert files[f"{render.CREDENTIALS_DIR}/orthanc-sync.password"]["content"] == vault_site["plain"] + "\n"
    assert files[f"{render.CREDENTIALS_DIR}/orthanc-sync.password"]["secret"] is True
    # The run was verbose, and the plan tasks still kept the secret out of the output.
    assert vault_site["plain"] not in result.stdout


def test_vault_secret_without_password_fails_naming_file(site_file, tmp_path, vault_site):
    result = dump_plans(site_file, tmp_path,
                        env=ansible_env(DICOMFLEET_SECRETS_DIR=str(vault_site["secrets_dir"])))

    assert result.returncode == 2
    assert f"The secret file {vault_site['secret_file']} is encrypted with ansible-vault" in result.stdout
    assert vault_site["plain"] not in result.stdout


# Lint ------------------------------------------------------------------------------------------


def test_ansible_lint_production_profile_passes():
    result = subprocess.run(
        [str(VENV_BIN / "ansible-lint"), "--profile", "production", "--offline", "--nocolor",
         "playbook.yml", "roles", "molecule"],
        cwd=ROOT, env=ansible_env(), capture_output=True, text=True, timeout=600,
    )

    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Profile 'production' was required, and it passed." in result.stderr + result.stdout
