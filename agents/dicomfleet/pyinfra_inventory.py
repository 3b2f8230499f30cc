"""Give pyinfra the hosts of a dicomfleet inventory, validated before any connection.

Usage: ``DICOMFLEET_INVENTORY=inventory/lab.yml pyinfra dicomfleet.pyinfra_inventory.hosts deploy.py``
(``dicomfleet deploy`` does this for you).
"""

from __future__ import annotations

import os

from dicomfleet import lab, render
from dicomfleet.inventory import InventoryError, Site, load_site

INVENTORY_VARIABLE = "DICOMFLEET_INVENTORY"


def connection_data(site: Site, host: str) -> dict:
    """Return pyinfra's SSH data for HOST, from its Ansible connection variables."""
    variables = site.hosts[host].vars
    data = {
        "ssh_hostname": str(variables.get("ansible_host", host)),
        "dicomfleet_host": host,
    }
    if "ansible_user" in variables:
        data["ssh_user"] = str(variables["ansible_user"])
    if "ansible_port" in variables:
        data["ssh_port"] = int(variables["ansible_port"])
    if "ansible_ssh_private_key_file" in variables:
        data["ssh_key"] = str(variables["ansible_ssh_private_key_file"])
    if variables.get("dicomfleet_lab"):
        data["ssh_known_hosts_file"] = str(lab.known_hosts_path())
        data["ssh_strict_host_key_checking"] = "yes"
    return data


def hosts() -> dict[str, list]:
    """Return pyinfra's groups for the inventory named by $DICOMFLEET_INVENTORY."""
    path = os.environ.get(INVENTORY_VARIABLE)
    if not path:
        raise RuntimeError(
            f"{INVENTORY_VARIABLE} is not set; set it to the inventory file, "
            f"for example {INVENTORY_VARIABLE}=inventory/lab.yml"
        )

    try:
        site = load_site(path)
    except InventoryError as error:
        # pyinfra prints this message and stops before connecting to any host.
        raise RuntimeError("invalid inventory:\n" + "\n".join(error.problems)) from None

    groups: dict[str, list] = {"central": [], "agents": []}
    for host in render.deployed_hosts(site):
        entry = (host, connection_data(site, host))
        if host in site.servers:
            groups["central"].append(entry)
        else:
            groups["agents"].append(entry)
    return groups
