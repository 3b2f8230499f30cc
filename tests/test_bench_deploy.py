"""Unit tests of bench.deploy_bench: change counts read from pyinfra and Ansible output, and the lab inventory."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

# bench/ is a top-level package of the checkout, not part of the installed dicomfleet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomfleet.inventory import load_site  # noqa: E402

from bench import deploy_bench  # noqa: E402

PYINFRA_OUTPUT = """--> Starting operation: Ensure the Orthanc configuration is present.
    [central] Success
    [ct1] No changes
    [mr1] No changes
--> Starting operation: Ensure the agent unit is present.
    [ct1] Success on retry 1
    [mr1] \x1b[32mSuccess\x1b[0m
    [xr1] Skipped
    [central] Error
"""

ANSIBLE_RECAP = """PLAY RECAP *********************************************************************
central                    : ok=41   changed=0    unreachable=0    failed=0    skipped=9    rescued=0    ignored=0
ct1                        : ok=25   changed=2    unreachable=0    failed=0    skipped=12   rescued=0    ignored=0
localhost                  : ok=3    changed=0    unreachable=0    failed=0    skipped=0    rescued=0    ignored=0
"""


def test_pyinfra_changes_per_host():
    changes = deploy_bench.pyinfra_changes(PYINFRA_OUTPUT)
    assert changes == {"central": 1, "ct1": 1, "mr1": 1}


def test_pyinfra_no_change_output():
    assert deploy_bench.pyinfra_changes("    [central] No changes\n") == {}


def test_pyinfra_output_without_results_is_none():
    assert deploy_bench.pyinfra_changes("--> Loading config...\n") is None


def test_ansible_changes_from_recap():
    assert deploy_bench.ansible_changes(ANSIBLE_RECAP) == {"ct1": 2}


def test_ansible_failed_host_is_none():
    recap = "ct1 : ok=3 changed=0 unreachable=0 failed=1 skipped=0\n"
    assert deploy_bench.ansible_changes(recap) is None


def test_ansible_unreachable_host_is_none():
    recap = "ct1 : ok=0 changed=0 unreachable=1 failed=0 skipped=0\n"
    assert deploy_bench.ansible_changes(recap) is None


def test_lab_inventory_own_addresses_and_ports(tmp_path):
    site = load_site(deploy_bench.write_inventory(tmp_path))
    addresses = [str(entry.vars["ansible_host"]) for entry in site.hosts.values()]
    assert site.name == "bench"
    assert all(ipaddress.ip_address(address) in ipaddress.ip_network("127.0.10.180/30") for address in addresses)
    assert site.servers["central"].http_port == deploy_bench.HTTP_PORT
