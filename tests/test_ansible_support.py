"""Helpers for the Ansible tests: run ansible-playbook from the checkout's venv, write inventories.

It contains no test; the test_ansible_*.py modules import it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
PLAYBOOK = ROOT / "playbook.yml"
PLAN_ACTION = ROOT / "roles" / "dicomfleet_common" / "action_plugins" / "dicomfleet_plan.py"

# A playbook that writes each deployed host's plan as JSON on the controller.
# It runs the plan tasks only, which never contact a host.
PLAN_DUMP_PLAYBOOK = """\
- name: Write each host's plan on the controller.
  hosts: all
  gather_facts: false
  tasks:
    - name: Compute the host's plan.
      ansible.builtin.import_role:
        name: dicomfleet_common
        tasks_from: plan.yml

    - name: Write the plan to a file.
      ansible.builtin.copy:
        content: "{{ dicomfleet_common_plan | to_nice_json }}"
        dest: "{{ plan_folder }}/{{ inventory_hostname }}.json"
        mode: "0600"
      delegate_to: localhost
"""


def load_plan_action():
    """Import the dicomfleet_plan action plugin as a module."""
    name = "dicomfleet_plan_action"
    if name in sys.modules:
        return sys.modules[name]

    spec = importlib.util.spec_from_file_location(name, PLAN_ACTION)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the module runs.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ansible_env(**extra: str) -> dict[str, str]:
    """Return an environment that runs the venv's Ansible with the checkout's ansible.cfg."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env.update(extra)
    return env


def run_playbook(inventory: Path | list[Path], *arguments: str, playbook: Path = PLAYBOOK,
                 env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ansible-playbook on INVENTORY (one source or several) and return the finished process."""
    sources = inventory if isinstance(inventory, list) else [inventory]
    command = [str(VENV_BIN / "ansible-playbook")]
    for source in sources:
        command += ["-i", str(source)]
    command += [*arguments, str(playbook)]
    return subprocess.run(command, cwd=ROOT, env=env or ansible_env(), capture_output=True, text=True,
                          timeout=timeout)


def fake_wheelhouse(folder: Path) -> Path:
    """Write a wheelhouse folder with the two wheels a plan names, for tests that deploy nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pip-0.0-py3-none-any.whl").write_bytes(b"a stand-in pip wheel\n")
    (folder / "dicomfleet-0.0-py3-none-any.whl").write_bytes(b"a stand-in dicomfleet wheel\n")
    return folder


def write_site(path: Path, site: str, central: str, scanners: dict[str, str],
               dicom_machines: dict[str, str] | None = None, **central_vars) -> Path:
    """Write a lab inventory: one central host and agent scanners, each at its address.

    SCANNERS and DICOM_MACHINES map host names to addresses; a DICOM machine
    sends C-STORE itself, so nothing is deployed on it. CENTRAL_VARS are set on
    the central host, for example its ports.
    """
    scanner_hosts = {}
    for index, (name, address) in enumerate(scanners.items(), start=1):
        scanner_hosts[name] = {
            "ansible_host": address,
            "dicomfleet_machine_id": name,
            "dicomfleet_ae_title": f"CT_{name.upper()}",
            "dicomfleet_modality": "CT",
            "dicomfleet_location": f"Test room {index}",
            "dicomfleet_ingest": "agent",
            "dicomfleet_watch_folders": ["/srv/dicom/export"],
        }
    for name, address in (dicom_machines or {}).items():
        scanner_hosts[name] = {
            "ansible_host": address,
            "dicomfleet_machine_id": name,
            "dicomfleet_ae_title": f"US_{name.upper()}",
            "dicomfleet_modality": "US",
            "dicomfleet_location": "Test ultrasound cart",
            "dicomfleet_ingest": "dicom",
        }

    central_host = {"ansible_host": central, "dicomfleet_mongodb_bind": central, **central_vars}
    document = {
        "all": {
            "vars": {
                "dicomfleet_site": site,
                "dicomfleet_lab": True,
                "ansible_user": "root",
                "ansible_ssh_private_key_file": "/var/cache/dicomfleet/lab-key",
            },
            "children": {
                "central": {"hosts": {"central": central_host}},
                "scanners": {"hosts": scanner_hosts},
            },
        }
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path
