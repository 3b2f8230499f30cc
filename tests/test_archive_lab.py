"""The archive deployed on lab hosts: hardened units, TLS, users, secrets, the cluster, backups.

One deploy puts the site ``archlab`` (tests/test_archive_support.py) on five lab
hosts: a standalone Orthanc with plugins, two cluster nodes sharing PostgreSQL and
a storage folder, the host with PostgreSQL and the balancer, and a file server
running the agent of the share machines. The tests run in
file order: the last ones change the inventory. Firewall rules are rendered and
syntax-checked but never loaded, because lab hosts share this machine's network.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pymongo
import pytest
import requests
from pydicom.uid import generate_uid

from dicomfleet import credentials, deployment, lab, localservers
from dicomfleet.inventory import load_site
from test_archive_support import (
    BALANCER_URL,
    CLUSTER_MONGODB_PORT,
    DB,
    FILE_SERVER,
    NODES,
    SHARED_STORAGE,
    VAULT,
    VAULT_URL,
    make_instance,
    md5,
    prepare_mount_propagation,
    share_storage,
    unshare_storage,
    wait_for,
    write_inventory,
)

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
HOSTS = {"vault": VAULT, "db": DB, "fs": FILE_SERVER, **NODES}
SECURITY_LIMIT = 2.0

# Files the cluster test sends: studies of several instances, half before one node stops.
CLUSTER_STUDIES = 8
CLUSTER_INSTANCES_PER_STUDY = 5

_RESULT_LINE = re.compile(r"^\s+\[([A-Za-z0-9_.-]+)\]\s+(Success|No changes|Skipped|Error)\s*$")


def _changes_per_host(result: subprocess.CompletedProcess) -> collections.Counter:
    """Count the operations pyinfra reported as changed, per host; pyinfra prints them on stderr."""
    changed = collections.Counter()
    for line in (result.stdout + result.stderr).splitlines():
        match = _RESULT_LINE.match(line)
        if match and match.group(2) == "Success":
            changed[match.group(1)] += 1
    return changed


def _save_artifact(name: str, content: dict) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update(content)
    path.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archlab")
    for artifact in ARTIFACTS.glob("archive-*"):
        artifact.unlink()
    path = write_inventory(folder)
    site = load_site(path)
    for host in NODES:
        unshare_storage(host)
    shutil.rmtree(SHARED_STORAGE, ignore_errors=True)
    prepare_mount_propagation()
    lab.up(site, fresh=True)
    for host, address in NODES.items():
        share_storage(host, address)

    started = time.monotonic()
    first = deployment.deploy(path, capture=True)
    seconds = time.monotonic() - started
    secrets = credentials.existing_secrets(site)
    ca = str(secrets.folder / "tls" / "site-ca.pem")
    if first.returncode == 0:
        _wait_for_orthanc(ca)
    yield {"path": path, "site": site, "first": first, "seconds": seconds, "folder": folder,
           "secrets": secrets, "ca": ca}
    for host in NODES:
        unshare_storage(host)
    lab.down(site)


def _wait_for_orthanc(ca: str) -> None:
    """Wait until the standalone Orthanc and the cluster respond over HTTPS; keep their logs when they do not."""
    def answering() -> bool:
        try:
            return all(requests.get(f"{url}/system", verify=ca, timeout=10).status_code == 401
                       for url in (VAULT_URL, BALANCER_URL))
        except requests.RequestException:
            return False

    try:
        wait_for(answering, 120, interval=2, what="Orthanc behind nginx on vault and the cluster")
    except AssertionError:
        ARTIFACTS.mkdir(exist_ok=True)
        logs = []
        for host, address in {"vault": VAULT, **NODES}.items():
            result = lab.ssh(address, "journalctl -u orthanc --no-pager | tail -40; "
                                      "tail -40 /var/log/orthanc/Orthanc.log", check=False)
            logs.append(f"--- {host}\n{result.stdout}{result.stderr}")
        (ARTIFACTS / "archive-lab-orthanc.log").write_text("\n".join(logs))


def _admin(deployed) -> tuple[str, str]:
    return (credentials.ADMIN_USER, deployed["secrets"].orthanc_password(credentials.ADMIN_USER))


def _get(deployed, url: str, auth=None, **kwargs) -> requests.Response:
    return requests.get(url, auth=auth, verify=deployed["ca"], timeout=30, **kwargs)


def test_first_deploy_succeeds(deployed):
    result = deployed["first"]
    _save_artifact("archive-lab.json", {"first_deploy_seconds": round(deployed["seconds"], 1)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.parametrize("host, unit", [
    ("vault", "orthanc.service"), ("vault", "nginx.service"), ("vault", "dicomfleet-sync.service"),
    ("vault", "dicomfleet-backup-index.timer"), ("vault", "dicomfleet-backup-storage.timer"),
    ("n1", "orthanc.service"), ("n1", "nginx.service"), ("n1", "dicomfleet-sync.service"),
    ("n1", "dicomfleet-backup-index.timer"),
    ("n2", "orthanc.service"), ("n2", "nginx.service"),
    ("db", "postgresql@15-main.service"), ("db", "nginx.service"),
    ("fs", "dicomfleet-agent.service"),
])
def test_unit_active(deployed, host, unit):
    result = lab.ssh(HOSTS[host], f"systemctl is-active {unit}", check=False)
    assert result.stdout.strip() == "active"


def test_secondary_node_runs_no_sync(deployed):
    result = lab.ssh(NODES["n2"], "systemctl cat dicomfleet-sync.service", check=False)
    assert result.returncode != 0


def test_firewall_not_loaded_in_lab(deployed):
    result = lab.ssh(VAULT, "systemctl is-enabled dicomfleet-firewall.service", check=False)
    assert result.stdout.strip() in ("disabled", "")


@pytest.mark.parametrize("host", ["db", "n1", "n2", "vault"])
def test_deployed_firewall_rules_valid(deployed, host, tmp_path):
    rules = lab.ssh(HOSTS[host], "cat /etc/dicomfleet/firewall.nft").stdout
    path = tmp_path / "firewall.nft"
    path.write_text(rules)
    result = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# Units this deploy installs or sandboxes, on the hosts where they run.
SCORED_UNITS = [
    ("vault", "orthanc.service"), ("vault", "nginx.service"), ("vault", "dicomfleet-sync.service"),
    ("vault", "dicomfleet-mongodb.service"), ("vault", "dicomfleet-backup-index.service"),
    ("vault", "dicomfleet-backup-storage.service"), ("vault", "dicomfleet-firewall.service"),
    ("vault", "nftables.service"),
    ("n1", "orthanc.service"), ("n1", "dicomfleet-backup-index.service"),
    ("db", "postgresql.service"), ("db", "postgresql@15-main.service"), ("db", "nginx.service"),
    ("fs", "dicomfleet-agent.service"),
]


@pytest.mark.parametrize("host, unit", SCORED_UNITS)
def test_unit_exposure_at_most_2(deployed, host, unit):
    output = lab.ssh(HOSTS[host], f"systemd-analyze security {unit}").stdout
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", output).group(1))
    _save_artifact("archive-security-scores.json", {f"{host} {unit}": score})
    assert score <= SECURITY_LIMIT


def test_debian_orthanc_unit_unsafe_without_drop_in(deployed):
    # Under another name, the unit is analysed without the drop-in the deploy added.
    output = lab.ssh(VAULT, "cp /lib/systemd/system/orthanc.service /tmp/orthanc-debian.service && "
                            "systemd-analyze security --offline=yes /tmp/orthanc-debian.service").stdout
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", output).group(1))
    _save_artifact("archive-security-scores.json", {"vault orthanc.service without the drop-in": score})
    assert score > 9.0


def test_nginx_runs_as_www_data(deployed):
    users = lab.ssh(VAULT, "ps -o user= -C nginx | sort -u").stdout.split()
    assert users == ["www-data"]


def test_orthanc_loads_requested_plugins(deployed):
    plugins = _get(deployed, f"{VAULT_URL}/plugins", auth=_admin(deployed)).json()
    assert {"dicom-web", "web-viewer", "gdcm"} <= set(plugins)


def test_webviewer_cache_outside_storage(deployed):
    log = lab.ssh(VAULT, "cat /var/log/orthanc/Orthanc.log").stdout
    folders = re.findall(r"Storing the cache of the Web viewer in folder: (\S+)", log)
    assert folders[-1] == "/var/lib/orthanc/webviewer-cache"


def test_cluster_node_uses_postgresql_index(deployed):
    system = _get(deployed, f"{BALANCER_URL}/system", auth=_admin(deployed)).json()
    assert system["DatabaseBackendPlugin"].endswith("libOrthancPostgreSQLIndex.so.4.0")


def test_https_without_credentials_401(deployed):
    assert _get(deployed, f"{VAULT_URL}/system").status_code == 401


def test_https_wrong_password_401(deployed):
    assert _get(deployed, f"{VAULT_URL}/system", auth=("share1", "not-the-password")).status_code == 401


def test_https_machine_user_200(deployed):
    auth = ("share1", deployed["secrets"].orthanc_password("share1"))
    assert _get(deployed, f"{VAULT_URL}/system", auth=auth).status_code == 200


def test_https_rejects_unknown_ca(deployed):
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{VAULT_URL}/system", timeout=30)


def test_balancer_without_credentials_401(deployed):
    assert _get(deployed, f"{BALANCER_URL}/system").status_code == 401


# Secrets ------------------------------------------------------------------------

SCAN_SCRIPT = r'''
import grp, json, os, pwd, stat, subprocess, sys
SECRETS = json.loads(SECRETS_JSON)
ROOTS = ("/etc", "/var", "/opt", "/srv", "/run", "/root", "/home", "/tmp", "/usr/local")
own = {os.getpid(), os.getppid()}
found = {"cmdline": [], "environ": [], "files": [], "journal": []}

def secrets_in(data):
    return [name for name, value in SECRETS.items() if value.encode() in data]

for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) in own:
        continue
    for kind in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{kind}", "rb") as handle:
                data = handle.read()
            with open(f"/proc/{pid}/comm") as handle:
                command = handle.read().strip()
        except OSError:
            continue
        for name in secrets_in(data):
            found[kind].append([pid, command, name])

for root in ROOTS:
    for folder, subfolders, names in os.walk(root):
        if folder.startswith(("/var/lib/orthanc", "/srv/dicomfleet/storage", "/var/lib/postgresql",
                              "/opt/dicomfleet/wheels")):
            subfolders.clear()
            continue
        for name in names:
            path = os.path.join(folder, name)
            try:
                info = os.lstat(path)
                if not stat.S_ISREG(info.st_mode) or info.st_size > 4_000_000:
                    continue
                with open(path, "rb") as handle:
                    data = handle.read()
            except OSError:
                continue
            hits = secrets_in(data)
            if hits:
                found["files"].append([path, oct(stat.S_IMODE(info.st_mode)), pwd.getpwuid(info.st_uid).pw_name,
                                       grp.getgrgid(info.st_gid).gr_name, hits])

journal = subprocess.run(["journalctl", "--no-pager", "-o", "cat"], capture_output=True).stdout
found["journal"] = secrets_in(journal)
print(json.dumps(found))
'''


def _site_secrets(deployed) -> dict[str, str]:
    """Return every secret of the site by file name, the TLS private keys among them."""
    folder = deployed["secrets"].folder
    found = {}
    for path in sorted(folder.glob("*")):
        if path.is_file():
            found[path.name] = path.read_text().strip()
    for path in sorted((folder / "tls").glob("*.key")):
        # Every P-256 key in PKCS #8 starts with the same 48 base64 characters of ASN.1 header.
        key_body = "".join(path.read_text().strip().splitlines()[1:-1])
        found[f"tls/{path.name}"] = key_body[48:96]
    return found


@pytest.fixture(scope="module")
def secret_scan(deployed):
    """Scan every host for the site's secrets.

    The scanning program and the secrets travel on ssh's standard input, which
    ``python3 -`` reads, so no command line carries a secret.
    """
    program = f"SECRETS_JSON = {json.dumps(json.dumps(_site_secrets(deployed)))}\n" + SCAN_SCRIPT
    results = {}
    for host, address in HOSTS.items():
        command = ["ssh", *lab.ssh_options(), f"root@{address}", "python3 -"]
        result = subprocess.run(command, input=program, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        results[host] = json.loads(result.stdout)
    return results


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_no_secret_on_command_lines(secret_scan, host):
    assert secret_scan[host]["cmdline"] == []


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_no_secret_in_environments(secret_scan, host):
    assert secret_scan[host]["environ"] == []


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_no_secret_in_journal(secret_scan, host):
    assert secret_scan[host]["journal"] == []


# Groups of the services that read a secret file through their group.
SERVICE_GROUPS = {"root", "orthanc", "www-data", "postgres"}


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_secret_files_private(secret_scan, host):
    exposed = []
    for path, mode, owner, group, names in secret_scan[host]["files"]:
        bits = int(mode, 8)
        if path.startswith("/run/credentials/"):
            # systemd's copy for one service, readable by that service alone.
            continue
        if bits & 0o007 or (bits & 0o070 and group not in SERVICE_GROUPS and not group.startswith("dicomfleet-")):
            exposed.append((path, mode, owner, group, names))
    assert exposed == []


def test_site_ca_key_never_leaves_control_machine(deployed, secret_scan):
    ca_key = "tls/site-ca.key"
    holders = [(host, entry[0]) for host, scan in secret_scan.items() for entry in scan["files"]
               if ca_key in entry[4]]
    assert holders == []


# The cluster ------------------------------------------------------------------------


def _agent_config(deployed, folder: Path, watch: Path) -> Path:
    """Render the file server's agent config for a local agent that sends ct1's files through the balancer.

    The config keeps ct1 alone, points it at the balancer with the site CA, and
    leaves heartbeats out.
    """
    path = localservers.write_agent_config(deployed["site"], "fs", folder, deployed["secrets"])
    head, *machines = path.read_text().split("\n[[machine]]\n")
    head = re.sub(r"(?ms)^(#[^\n]*heartbeat[^\n]*\n)?\[heartbeat\].*", "", head)
    (ct1,) = [block for block in machines if block.startswith('id = "ct1"')]
    ct1 = re.sub(r'(?m)^orthanc_url = .*$', f'orthanc_url = "{BALANCER_URL}"', ct1)
    ct1 = ct1.replace('"/srv/share/ct1"', json.dumps(str(watch)))
    ct1 = re.sub(r'(?m)^ca_file = .*\n', "", ct1)
    ct1 += f"ca_file = {json.dumps(deployed['ca'])}\n"
    path.write_text(head.rstrip() + "\n\n[[machine]]\n" + ct1)
    return path


def _node_uploads(address: str) -> int:
    """Count the uploads the node's nginx completed with status 200."""
    log = lab.ssh(address, "cat /var/log/nginx/access.log").stdout
    return len(re.findall(r'"POST /instances HTTP/[0-9.]+" 200 ', log))


def _requests_answered(address: str, status: int) -> int:
    """Count the requests of any kind the node's nginx completed with STATUS."""
    log = lab.ssh(address, "cat /var/log/nginx/access.log").stdout
    return len(re.findall(rf'" {status} ', log))


@pytest.fixture(scope="module")
def cluster_run(deployed, tmp_path_factory):
    """Send studies through the balancer with the real agent and stop node n2 half-way."""
    folder = tmp_path_factory.mktemp("cluster-agent")
    watch = folder / "export"
    watch.mkdir()
    config = _agent_config(deployed, folder, watch)
    auth = _admin(deployed)

    def stored_count() -> int:
        return _get(deployed, f"{BALANCER_URL}/statistics", auth=auth).json()["CountInstances"]

    studies = {}
    files = []
    for number in range(CLUSTER_STUDIES):
        study_uid = generate_uid()
        studies[study_uid] = []
        for _ in range(CLUSTER_INSTANCES_PER_STUDY):
            data = make_instance(study_uid=study_uid)
            studies[study_uid].append(md5(data))
            files.append(data)
    half = len(files) // 2

    log_path = ARTIFACTS / "archive-cluster-agent.log"
    ARTIFACTS.mkdir(exist_ok=True)
    with open(log_path, "wb") as log:
        agent = subprocess.Popen([sys.executable, "-m", "dicomfleet", "agent", "--config", str(config)],
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        for index, data in enumerate(files[:half]):
            (watch / f"first-{index:03d}.dcm").write_bytes(data)
        try:
            wait_for(lambda: stored_count() >= half // 2, 120, what="half of the first batch in Orthanc")
        except AssertionError as error:
            raise AssertionError(f"{error}; the agent logged:\n{log_path.read_text()[-3000:]}") from None

        lab.ssh(NODES["n2"], "systemctl stop orthanc.service")
        stopped_at = time.monotonic() - started
        n2_before_stop = _node_uploads(NODES["n2"])

        for index, data in enumerate(files[half:]):
            (watch / f"second-{index:03d}.dcm").write_bytes(data)
        wait_for(lambda: stored_count() >= len(files), 240, what="every file in Orthanc")
        all_stored = time.monotonic() - started
    finally:
        agent.terminate()
        agent.wait(timeout=60)

    mongodb = pymongo.MongoClient(f"mongodb://{NODES['n1']}:{CLUSTER_MONGODB_PORT}/", serverSelectionTimeoutMS=5000)

    def recorded():
        records = list(mongodb["dicomfleet"].studies.find({"studyInstanceUID": {"$in": list(studies)}}))
        complete = [r for r in records if r.get("instanceCount") == CLUSTER_INSTANCES_PER_STUDY]
        return records if len(complete) == len(studies) else None

    try:
        records = wait_for(recorded, 180, interval=2, what="every study in MongoDB with all its instances")
    except AssertionError:
        records = list(mongodb["dicomfleet"].studies.find({"studyInstanceUID": {"$in": list(studies)}}))
    all_recorded = time.monotonic() - started
    mongodb.close()
    lab.ssh(NODES["n2"], "systemctl start orthanc.service")

    figures = {
        "files": len(files),
        "studies": len(studies),
        "n2_stopped_after_s": round(stopped_at, 1),
        "all_files_stored_after_s": round(all_stored, 1),
        "all_studies_in_mongodb_after_s": round(all_recorded, 1),
        "uploads_through_n1": _node_uploads(NODES["n1"]),
        "uploads_through_n2": n2_before_stop,
        "files_in_shared_storage": sum(1 for p in SHARED_STORAGE.rglob("*") if p.is_file()),
        # Each 502 from the stopped node's nginx is a request the balancer sent on to n1.
        "requests_retried_on_n1": _requests_answered(NODES["n2"], 502),
    }
    _save_artifact("archive-cluster-figures.json", figures)
    return {"studies": studies, "files": files, "records": records, "figures": figures,
            "agent_log": log_path.read_text(errors="replace")}


def test_cluster_every_file_stored_once(deployed, cluster_run):
    statistics = _get(deployed, f"{BALANCER_URL}/statistics", auth=_admin(deployed)).json()
    assert statistics["CountInstances"] == len(cluster_run["files"])


def test_cluster_shared_storage_holds_one_file_per_instance(cluster_run):
    assert cluster_run["figures"]["files_in_shared_storage"] == len(cluster_run["files"])


def test_cluster_both_nodes_received_uploads(cluster_run):
    figures = cluster_run["figures"]
    assert (figures["uploads_through_n1"] > 0, figures["uploads_through_n2"] > 0) == (True, True)


def test_cluster_stored_files_identical(deployed, cluster_run):
    auth = _admin(deployed)
    stored = collections.Counter()
    for instance in _get(deployed, f"{BALANCER_URL}/instances", auth=auth).json():
        stored[md5(_get(deployed, f"{BALANCER_URL}/instances/{instance}/file", auth=auth).content)] += 1
    sent = collections.Counter(value for values in cluster_run["studies"].values() for value in values)
    assert stored == sent


def test_cluster_every_study_in_mongodb(cluster_run):
    counts = {r["studyInstanceUID"]: r.get("instanceCount") for r in cluster_run["records"]}
    assert counts == {uid: CLUSTER_INSTANCES_PER_STUDY for uid in cluster_run["studies"]}


def test_cluster_records_name_source_machine(cluster_run):
    assert {r.get("sourceMachine") for r in cluster_run["records"]} == {"ct1"}


# Backups ----------------------------------------------------------------------------


def test_vault_index_backup_restarts_orthanc(deployed):
    data = make_instance()
    auth = _admin(deployed)
    answer = requests.post(f"{VAULT_URL}/instances", data=data, auth=auth, verify=deployed["ca"], timeout=30)
    assert answer.status_code == 200
    lab.ssh(VAULT, "systemctl start dicomfleet-backup-index.service")
    backups = lab.ssh(VAULT, "ls /var/backups/dicomfleet/index").stdout.split()
    # The backup unit starts Orthanc again through OnSuccess= once the copy ends.
    wait_for(lambda: _get(deployed, f"{VAULT_URL}/system", auth=auth).status_code == 200, 60,
             what="Orthanc to answer again after the index backup")
    state = lab.ssh(VAULT, "systemctl is-active orthanc.service", check=False).stdout.strip()
    assert (len([b for b in backups if b.endswith(".sqlite3")]), state) == (1, "active")


def test_vault_storage_snapshot(deployed):
    lab.ssh(VAULT, "systemctl start dicomfleet-backup-storage.service")
    snapshot = json.loads(lab.ssh(VAULT, "cat /var/backups/dicomfleet/storage/*.json").stdout)
    index = json.loads(lab.ssh(VAULT, "cat /var/backups/dicomfleet/index/*.json").stdout)
    listing = lab.ssh(VAULT, "find /var/backups/dicomfleet/storage -type f").stdout
    assert snapshot["files"] == index["attachments"], listing


def test_cluster_restore_from_pg_dump(deployed, cluster_run):
    """Back up the cluster from n1, wipe its index and storage, restore, and compare."""
    n1 = NODES["n1"]
    lab.ssh(n1, "systemctl start dicomfleet-backup-index.service dicomfleet-backup-storage.service")
    for address in NODES.values():
        lab.ssh(address, "systemctl stop orthanc.service")

    database = "orthanc_main"
    lab.ssh(DB, f"cd / && runuser -u postgres -- psql --quiet --port 5532 --dbname {database} "
                "--command 'DROP OWNED BY orthanc_main'")
    lab.ssh(n1, "find /srv/dicomfleet/storage -mindepth 1 -delete")
    restored = lab.ssh(n1, "/opt/dicomfleet/venv/bin/dicomfleet restore --config /etc/dicomfleet/backup.toml",
                       check=False)
    for address in NODES.values():
        lab.ssh(address, "systemctl start orthanc.service")

    auth = _admin(deployed)
    wait_for(lambda: _get(deployed, f"{BALANCER_URL}/system", auth=auth).status_code == 200, 60,
             what="the cluster to answer after the restore")
    count = _get(deployed, f"{BALANCER_URL}/statistics", auth=auth).json()["CountInstances"]
    _save_artifact("archive-cluster-figures.json", {"instances_after_restore": count})
    assert (restored.returncode, count) == (0, len(cluster_run["files"])), restored.stdout + restored.stderr


# Later deploys --------------------------------------------------------------------------


def test_second_deploy_changes_nothing(deployed):
    second = deployment.deploy(deployed["path"], capture=True)
    reported = [line for line in (second.stdout + second.stderr).splitlines() if _RESULT_LINE.match(line)]
    assert second.returncode == 0, second.stderr[-3000:]
    assert reported != []
    assert _changes_per_host(second) == collections.Counter()


def test_retired_machine_loses_access(deployed):
    auth = ("share2", deployed["secrets"].orthanc_password("share2"))
    before = _get(deployed, f"{VAULT_URL}/system", auth=auth).status_code

    retired = write_inventory(deployed["folder"], with_share2=False)
    result = deployment.deploy(retired, capture=True)
    assert result.returncode == 0, result.stderr[-3000:]

    # The deploy restarted Orthanc; nginx returns 502 until Orthanc listens again.
    after = wait_for(lambda: _get(deployed, f"{VAULT_URL}/system", auth=auth).status_code != 502 and
                     _get(deployed, f"{VAULT_URL}/system", auth=auth).status_code, 60,
                     what="Orthanc to answer after the deploy")
    others = _get(deployed, f"{VAULT_URL}/system",
                  auth=("share1", deployed["secrets"].orthanc_password("share1"))).status_code
    assert (before, after, others) == (200, 401, 200)
