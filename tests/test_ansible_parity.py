"""Parity of the two deploys: pyinfra and Ansible put the same files and units on fresh lab hosts.

The same inventory (one central host, one agent scanner, one machine that sends
DICOM itself) is deployed with `dicomfleet.deployment.deploy` onto fresh hosts,
snapshotted, then deployed with playbook.yml onto fresh hosts again and
snapshotted. Both runs share one site and one wheelhouse, so the site name,
the secrets, the addresses and the code are the same, and any difference is the
tools' own.
The hosts use 127.0.10.160 to .169 and their own ports.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from dicomfleet import credentials, deployment, lab, render, wheelhouse
from dicomfleet.inventory import load_site

from test_ansible_support import ansible_env, run_playbook, write_site

pytestmark = pytest.mark.lab

CENTRAL = "127.0.10.160"
SCANNER = "127.0.10.161"
# Sends DICOM itself: registered in Orthanc, never contacted.
DICOM_MACHINE = "127.0.10.164"
# Nothing listens here: the host that cannot be reached.
UNREACHABLE = "127.0.10.169"

# Folders compared whole, besides every path of the plan.
COMPARED_TREES = ("/etc/dicomfleet", "/etc/orthanc", "/etc/nginx", "/etc/systemd/system", "/opt/dicomfleet/wheels")

# Runs on a host with its python3: prints every compared path's type, owner,
# group, mode and content, the enabled units, the service users and the venv's packages.
SNAPSHOT_SCRIPT = r"""
import glob, grp, hashlib, json, os, pwd, stat, subprocess, sys

trees, paths, users, services = json.loads(sys.argv[1])


def name(lookup, number):
    try:
        return lookup(number)[0]
    except KeyError:
        return str(number)


entries = {}


def record(path):
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        entries[path] = None
        return
    mode = info.st_mode
    kind = "other"
    if stat.S_ISLNK(mode):
        kind = "link"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISREG(mode):
        kind = "file"
    entry = {"kind": kind, "owner": name(pwd.getpwuid, info.st_uid), "group": name(grp.getgrgid, info.st_gid),
             "mode": format(stat.S_IMODE(mode), "04o")}
    if kind == "file":
        with open(path, "rb") as handle:
            data = handle.read()
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        if len(data) < 65536:
            try:
                entry["text"] = data.decode("utf-8")
            except UnicodeDecodeError:
                pass
    if kind == "link":
        entry["target"] = os.readlink(path)
    entries[path] = entry


for tree in trees:
    for folder, folders, files in os.walk(tree):
        record(folder)
        for item in sorted(files) + [f for f in folders if os.path.islink(os.path.join(folder, f))]:
            record(os.path.join(folder, item))
for path in paths:
    record(path)

enabled = subprocess.run(["systemctl", "list-unit-files", "--state=enabled", "--no-legend", "--no-pager"],
                         capture_output=True, text=True).stdout.split("\n")
active = {unit: subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True).stdout.strip()
          for unit in services}
accounts = {}
for user in users:
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        accounts[user] = None
        continue
    accounts[user] = {"home": account.pw_dir, "shell": account.pw_shell,
                      "group": name(grp.getgrgid, account.pw_gid)}
packages = sorted(os.path.basename(p) for p in glob.glob("/opt/dicomfleet/venv/lib/python3*/site-packages/*.dist-info"))
print(json.dumps({"files": entries, "enabled": sorted(line.split()[0] for line in enabled if line.strip()),
                  "active": active, "users": accounts, "venv": packages}))
"""


def snapshot(site, host: str) -> dict:
    """Return what the deploy left on HOST: files, enabled units, service states, users, venv packages."""
    plan = render.plan_host(site, host, credentials.existing_secrets(site))
    paths = [f.path for f in plan.files] + [d.path for d in plan.directories]
    paths += sorted({str(Path(f.path).parent) for f in plan.files})
    paths += [r.path for r in plan.removed_paths]
    arguments = json.dumps([list(COMPARED_TREES), paths, plan.users, plan.services])

    result = lab.ssh(site.hosts[host].vars["ansible_host"], ["python3", "-c", SNAPSHOT_SCRIPT, arguments],
                     timeout=120)
    return json.loads(result.stdout)


def secret_paths(site) -> set[str]:
    """Return the paths of the files that hold secrets, on any host of SITE."""
    secrets = credentials.existing_secrets(site)
    return {f.path for host in render.deployed_hosts(site)
            for f in render.plan_host(site, host, secrets).files if f.secret}


def describe_differences(host: str, pyinfra: dict, ansible: dict, secret: set[str]) -> list[str]:
    """Return one message per difference between the two snapshots of HOST, with a diff of contents."""
    messages = []
    for path in sorted(set(pyinfra["files"]) | set(ansible["files"])):
        left = pyinfra["files"].get(path)
        right = ansible["files"].get(path)
        if left == right:
            continue

        if left is None or right is None:
            messages.append(f"{host}:{path}: present after {'Ansible' if left is None else 'pyinfra'} only "
                            f"(pyinfra {left and left['kind']}, Ansible {right and right['kind']}).")
            continue

        for key in ("kind", "owner", "group", "mode", "target"):
            if left.get(key) != right.get(key):
                messages.append(f"{host}:{path}: {key} is {left.get(key)!r} after pyinfra, "
                                f"{right.get(key)!r} after Ansible.")
        if left.get("sha256") != right.get("sha256"):
            if path in secret:
                messages.append(f"{host}:{path}: the secret content differs (not shown).")
            elif "text" in left and "text" in right:
                diff = difflib.unified_diff(left["text"].splitlines(), right["text"].splitlines(),
                                            f"pyinfra {path}", f"ansible {path}", lineterm="")
                messages.append(f"{host}:{path}: content differs:\n" + "\n".join(diff))
            else:
                messages.append(f"{host}:{path}: binary content differs.")

    for key in ("enabled", "active", "users", "venv"):
        if pyinfra[key] != ansible[key]:
            messages.append(f"{host}: {key} differs:\n  pyinfra {pyinfra[key]}\n  Ansible {ansible[key]}")
    return messages


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Deploy the parity site with pyinfra, then with Ansible onto fresh hosts; snapshot both."""
    folder = tmp_path_factory.mktemp("parity")
    path = write_site(folder / "parity.yml", "parity", CENTRAL, {"ct1": SCANNER},
                      dicom_machines={"us1": DICOM_MACHINE},
                      dicomfleet_orthanc_http_port=8160, dicomfleet_orthanc_dicom_port=4360,
                      dicomfleet_mongodb_port=27160, dicomfleet_dashboard_port=8060,
                      dicomfleet_https_port=8460, dicomfleet_orthanc_stable_age=2)
    site = load_site(path)
    secrets_dir = folder / "secrets"
    hosts = render.deployed_hosts(site)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DICOMFLEET_SECRETS_DIR", str(secrets_dir))

        lab.up(site, fresh=True)
        pyinfra_run = deployment.deploy(path, capture=True)
        pyinfra_snapshots = {host: snapshot(site, host) for host in hosts} if pyinfra_run.returncode == 0 else {}
        # Ansible installs the very wheels pyinfra installed, so the comparison
        # stays valid when the code changes between the two deploys.
        wheels = shutil.copytree(wheelhouse.default_wheelhouse(), folder / "wheelhouse")

        lab.up(site, fresh=True)
        ansible_run = run_playbook(path, "-e", f"dicomfleet_common_wheelhouse={wheels}",
                                   "-e", "dicomfleet_common_build_wheelhouse=false",
                                   env=ansible_env(DICOMFLEET_SECRETS_DIR=str(secrets_dir)))
        ansible_snapshots = {host: snapshot(site, host) for host in hosts} if ansible_run.returncode == 0 else {}

        yield {"folder": folder, "path": path, "site": site, "secrets_dir": secrets_dir, "hosts": hosts,
               "wheels": wheels,
               "pyinfra_run": pyinfra_run, "ansible_run": ansible_run,
               "pyinfra": pyinfra_snapshots, "ansible": ansible_snapshots,
               "secret_paths": secret_paths(site)}

        lab.down(site)


def test_pyinfra_deploy_succeeds(parity):
    run = parity["pyinfra_run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_ansible_deploy_succeeds(parity):
    run = parity["ansible_run"]
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]


def test_ansible_never_contacts_dicom_machine(parity):
    # Nothing listens on the machine's address, so any connection would make it unreachable.
    assert not lab.accepts_ssh(DICOM_MACHINE)
    assert re.search(r"^us1\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=0", parity["ansible_run"].stdout,
                     re.MULTILINE)


@pytest.mark.parametrize("host", ["central", "ct1"])
def test_managed_files_and_units_match(parity, host):
    pyinfra = parity["pyinfra"][host]
    ansible = parity["ansible"][host]
    compared = sum(1 for entry in pyinfra["files"].values() if entry and entry["kind"] == "file")
    print(f"{host}: compared {compared} files, {len(pyinfra['files'])} paths, {len(pyinfra['enabled'])} enabled units")

    differences = describe_differences(host, pyinfra, ansible, parity["secret_paths"])

    assert differences == [], "\n".join(differences)


@pytest.mark.parametrize("host, unit", [
    ("central", "orthanc.service"),
    ("central", "dicomfleet-mongodb.service"),
    ("central", "dicomfleet-sync.service"),
    ("ct1", "dicomfleet-agent.service"),
])
def test_ansible_service_active(parity, host, unit):
    assert parity["ansible"][host]["active"][unit] == "active"


def test_snapshot_covers_plan_files(parity):
    # Guards the comparison itself: every planned file was found after the Ansible deploy.
    site = parity["site"]
    secrets = credentials.existing_secrets(site)
    for host in parity["hosts"]:
        planned = [f.path for f in render.plan_host(site, host, secrets).files]
        missing = [path for path in planned if not parity["ansible"][host]["files"].get(path)]
        assert missing == [], host


def test_unreachable_host_named_and_others_converge(parity):
    document = yaml.safe_load(parity["path"].read_text())
    scanners = document["all"]["children"]["scanners"]["hosts"]
    scanners["ct9"] = dict(scanners["ct1"], ansible_host=UNREACHABLE, dicomfleet_machine_id="ct9",
                           dicomfleet_ae_title="CT_CT9", dicomfleet_location="Test room 9")
    with_unreachable = parity["folder"] / "with-unreachable" / "parity.yml"
    with_unreachable.parent.mkdir()
    with_unreachable.write_text(yaml.safe_dump(document, sort_keys=False))
    assert not lab.accepts_ssh(UNREACHABLE)

    result = run_playbook(with_unreachable, "-e", f"dicomfleet_common_wheelhouse={parity['wheels']}",
                          "-e", "dicomfleet_common_build_wheelhouse=false",
                          env=ansible_env(DICOMFLEET_SECRETS_DIR=str(parity["secrets_dir"])))
    credentials_json = lab.ssh(CENTRAL, "cat /etc/orthanc/credentials.json").stdout

    # ansible-playbook exits 4 when a host was unreachable.
    assert result.returncode == 4, result.stdout[-4000:]
    assert re.search(r"fatal: \[ct9\]: UNREACHABLE!", result.stdout)
    assert re.search(r"^ct9\s+: ok=\d+\s+changed=\d+\s+unreachable=1\s+failed=0", result.stdout, re.MULTILINE)
    assert re.search(r"^central\s+: ok=\d+\s+changed=[1-9]\d*\s+unreachable=0\s+failed=0", result.stdout,
                     re.MULTILINE)
    assert re.search(r"^ct1\s+: ok=\d+\s+changed=\d+\s+unreachable=0\s+failed=0", result.stdout, re.MULTILINE)
    assert '"ct9"' in credentials_json
