"""Time ``dicomfleet deploy`` on fresh lab hosts, cold and rerun, and the Ansible playbook's rerun.

The benchmark's lab site ``bench`` copies inventory/lab.yml onto 127.0.10.180 to
127.0.10.183 with its own Orthanc and MongoDB ports, so it never meets another lab.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dicomfleet import deployment, lab, wheelhouse
from dicomfleet.inventory import load_site

log = logging.getLogger(__name__)

SITE_NAME = "bench"
CENTRAL_ADDRESS = "127.0.10.180"
SCANNER_ADDRESSES = {"ct1": "127.0.10.181", "mr1": "127.0.10.182", "xr1": "127.0.10.183"}
HTTP_PORT = 8942
DICOM_PORT = 4942
MONGODB_PORT = 27917

# pyinfra 3 prints one line per host and operation: "    [host] Success", "No changes", "Skipped"
# or "Error", and "Success on retry N" after a retry.
_PYINFRA_RESULT = re.compile(r"^\s+\[([A-Za-z0-9_.-]+)\]\s+(Success|No changes|Skipped|Error)(?: on retry \d+)?\s*$")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# ansible-playbook's PLAY RECAP: "host : ok=12 changed=0 unreachable=0 failed=0 ...".
_ANSIBLE_RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


def pyinfra_changes(output: str) -> collections.Counter | None:
    """Return the operations pyinfra reported as changed (Success), per host, or None when OUTPUT has no result line.

    pyinfra 3 prints these lines on stderr, so OUTPUT must include it.
    """
    changed: collections.Counter = collections.Counter()
    results = 0
    for line in _ANSI_ESCAPE.sub("", output).splitlines():
        match = _PYINFRA_RESULT.match(line)
        if not match:
            continue
        results += 1
        if match.group(2) == "Success":
            changed[match.group(1)] += 1
    return changed if results else None


def ansible_changes(output: str) -> collections.Counter | None:
    """Return ``changed`` per host from ansible-playbook's PLAY RECAP, or None when a host failed or was unreachable."""
    changed: collections.Counter = collections.Counter()
    for line in _ANSI_ESCAPE.sub("", output).splitlines():
        match = _ANSIBLE_RECAP.match(line.strip())
        if not match:
            continue
        host, _ok, changes, unreachable, failed = match.groups()
        if int(unreachable) or int(failed):
            return None
        if int(changes):
            changed[host] += int(changes)
    return changed


def write_inventory(folder: Path) -> Path:
    """Write the benchmark lab's inventory into FOLDER, from the project's inventory/lab.yml."""
    source = wheelhouse.project_root() / "inventory" / "lab.yml"
    document = yaml.safe_load(source.read_text(encoding="utf-8"))
    document["all"]["vars"]["dicomfleet_site"] = SITE_NAME
    central = document["all"]["children"]["central"]["hosts"]["central"]
    central.update({
        "ansible_host": CENTRAL_ADDRESS,
        "dicomfleet_orthanc_http_port": HTTP_PORT,
        "dicomfleet_orthanc_dicom_port": DICOM_PORT,
        "dicomfleet_mongodb_port": MONGODB_PORT,
        "dicomfleet_mongodb_bind": CENTRAL_ADDRESS,
    })
    scanners = document["all"]["children"]["scanners"]["hosts"]
    for host, address in SCANNER_ADDRESSES.items():
        scanners[host]["ansible_host"] = address

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench-lab.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


@dataclasses.dataclass
class DeployResult:
    """Deploy timings on the benchmark lab."""

    hosts: int
    boot_s: float | None = None
    cold_s: float | None = None
    rerun_s: float | None = None
    rerun_changes: int | None = None
    ansible_first_s: float | None = None
    ansible_rerun_s: float | None = None
    ansible_rerun_changes: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def ansible_playbook_command(inventory: Path) -> list[str] | None:
    """Return the ansible-playbook command for INVENTORY, or None when the playbook or Ansible is missing."""
    root = wheelhouse.project_root()
    playbook = root / "playbook.yml"
    executable = Path(sys.executable).with_name("ansible-playbook")
    if not playbook.exists() or not (root / "roles").is_dir() or not executable.exists():
        return None
    return [str(executable), "-i", str(inventory), str(playbook)]


def _timed_deploy(inventory: Path, log_name: str) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``dicomfleet deploy`` on INVENTORY; keep its output beside the inventory as LOG_NAME."""
    started = time.monotonic()
    result = deployment.deploy(inventory, capture=True)
    seconds = time.monotonic() - started
    (inventory.parent / log_name).write_text(result.stdout + "\n" + result.stderr, encoding="utf-8")
    return seconds, result


def measure_deploys(folder: Path, with_ansible: bool = True) -> DeployResult:
    """Boot fresh lab hosts, deploy them cold with pyinfra, deploy again, then rerun with Ansible."""
    inventory = write_inventory(folder)
    site = load_site(inventory)
    result = DeployResult(hosts=len(SCANNER_ADDRESSES) + 1)
    try:
        started = time.monotonic()
        lab.up(site, fresh=True)
        result.boot_s = time.monotonic() - started

        seconds, cold = _timed_deploy(inventory, "deploy-cold.log")
        if cold.returncode != 0:
            result.notes.append(f"the cold deploy failed with status {cold.returncode}: {cold.stderr[-500:]}")
            log.error("The cold deploy failed: %s", cold.stdout[-2000:] + cold.stderr[-2000:])
            return result
        result.cold_s = seconds

        seconds, rerun = _timed_deploy(inventory, "deploy-rerun.log")
        if rerun.returncode != 0:
            result.notes.append(f"the rerun failed with status {rerun.returncode}: {rerun.stderr[-500:]}")
            return result
        result.rerun_s = seconds
        changes = pyinfra_changes(rerun.stdout + "\n" + rerun.stderr)
        if changes is None:
            result.notes.append("pyinfra's output of the rerun held no per-host result line, so its changes are "
                                "not counted")
        else:
            result.rerun_changes = sum(changes.values())

        command = ansible_playbook_command(inventory) if with_ansible else None
        if command is None:
            result.notes.append("the Ansible rerun was not measured: playbook.yml, roles/ or ansible-playbook "
                                "is missing")
            return result
        _measure_ansible(command, folder, result)
        return result
    finally:
        lab.down(site)


def _run_ansible(command: list[str], log_path: Path) -> tuple[float, int | None, str]:
    """Run ansible-playbook; return its seconds, the tasks it changed (None when it failed) and its output's end."""
    started = time.monotonic()
    run = subprocess.run(command, cwd=wheelhouse.project_root(), capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    log_path.write_text(run.stdout + "\n" + run.stderr, encoding="utf-8")
    changes = ansible_changes(run.stdout + "\n" + run.stderr)
    if run.returncode != 0 or changes is None:
        log.error("ansible-playbook failed with status %d; see %s.", run.returncode, log_path)
        return seconds, None, run.stdout[-500:]
    return seconds, sum(changes.values()), ""


def _measure_ansible(command: list[str], folder: Path, result: DeployResult) -> None:
    """Time ansible-playbook on the hosts pyinfra converged; logs go to FOLDER.

    Both tools render the same plan, so Ansible's first run should change nothing
    and is the rerun measured. When it changes tasks, a second run is timed instead.
    """
    seconds, changes, tail = _run_ansible(command, folder / "ansible-first.log")
    if changes is None:
        result.notes.append(f"the Ansible playbook failed: {tail}")
        return
    result.ansible_first_s = seconds
    if changes:
        result.notes.append(f"Ansible's first run after pyinfra changed {changes} tasks")
        seconds, changes, tail = _run_ansible(command, folder / "ansible-rerun.log")
        if changes is None:
            result.notes.append(f"the Ansible rerun failed: {tail}")
            return
    result.ansible_rerun_s = seconds
    result.ansible_rerun_changes = changes
