"""Checks of the archive's inventory variables: TLS, firewall, imaging network, clusters and backups.

validation.SCHEMA uses the value checks; validation.validate calls ``validate`` for
the rules that span several variables or hosts. Nothing here contacts a host.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable

from dicomfleet import cluster, firewall
from dicomfleet.dashboard import rollout
from dicomfleet.inventory import CENTRAL_GROUP, RawInventory, is_loopback

# Orthanc plugins from Debian's packages that dicomfleet configures, with the configuration file each ships.
PLUGIN_PACKAGES = {
    "orthanc-dicomweb": "/etc/orthanc/dicomweb.json",
    "orthanc-webviewer": "/etc/orthanc/webviewer.json",
    "orthanc-gdcm": "/etc/orthanc/gdcm.json",
}
TLS_FILES = ("dicomfleet_tls_certificate", "dicomfleet_tls_key", "dicomfleet_tls_ca_certificate")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_CALENDAR = re.compile(r"^[A-Za-z0-9*:,./~ +-]{1,100}$")


def networks_problem(value: Any) -> str | None:
    """Return why VALUE is not a list of IP addresses or networks, or None."""
    if not isinstance(value, list):
        return "must be a list of IP addresses or networks such as 10.20.0.0/24"
    for item in value:
        try:
            ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            return f"contains {item!r}, which is not an IP address or network such as 10.20.0.0/24"
    return None


def network_problem(value: Any) -> str | None:
    """Return why VALUE is not one IP network, or None."""
    try:
        ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        return "must be an IP network such as 10.20.0.0/24"
    return None


def vlan_problem(value: Any) -> str | None:
    """Return why VALUE is not an IEEE 802.1Q VLAN id (1 to 4094), or None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4094:
        return "must be a VLAN id from 1 to 4094"
    return None


def dns_names_problem(value: Any) -> str | None:
    """Return why VALUE is not a list of DNS names for a certificate, or None."""
    if not isinstance(value, list):
        return "must be a list of DNS names"
    for item in value:
        if not isinstance(item, str) or not _DNS_NAME.match(item):
            return f"contains {item!r}, which is not a DNS name"
    return None


def name_problem(value: Any) -> str | None:
    """Return why VALUE cannot name a cluster or a database, or None."""
    if not isinstance(value, str) or not _NAME.match(value):
        return ("must be 1 to 32 characters of lowercase letters, digits, '-' or '_', starting with "
                "a letter or digit (it names a PostgreSQL role and nginx settings)")
    return None


def calendar_problem(value: Any) -> str | None:
    """Return why VALUE cannot be a systemd OnCalendar= expression, or None.

    Only the character set is checked here; ``systemd-analyze calendar VALUE``
    checks the expression itself.
    """
    if not isinstance(value, str) or not _CALENDAR.match(value):
        return "must be a systemd calendar expression such as '*-*-* 02:30:00' or 'Sun *-*-* 03:30:00'"
    return None


def plugin_packages_problem(value: Any) -> str | None:
    """Return why VALUE is not a list of the Orthanc plugin packages dicomfleet configures, or None."""
    if not isinstance(value, list):
        return "must be a list of Debian packages among " + ", ".join(PLUGIN_PACKAGES)
    for item in value:
        if item not in PLUGIN_PACKAGES:
            return f"contains {item!r}; dicomfleet configures " + ", ".join(PLUGIN_PACKAGES)
    return None


def _validate_tls_files(raw: RawInventory, report: Callable[[str, str, str], None]) -> None:
    for entry in raw.hosts.values():
        present = [name for name in TLS_FILES if name in entry.vars]
        if present and len(present) != len(TLS_FILES):
            missing = [name for name in TLS_FILES if name not in entry.vars]
            report(entry.name, missing[0], "missing; a host with its own certificate needs "
                   + ", ".join(TLS_FILES) + " together (certificate chain, key and the CA clients trust)")


def _validate_regions(central: list, report: Callable[[str, str, str], None]) -> None:
    """Report two Orthanc servers that write to one MongoDB under the same name.

    The sync keeps one checkpoint and one record per study for each Orthanc
    name, so regions sharing a MongoDB need distinct names. The nodes of a
    cluster share one sync and so may share the name.
    """
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    for entry in central:
        uri = str(entry.vars.get("dicomfleet_mongodb_uri") or "")
        if not uri:
            continue
        name = str(entry.vars.get("dicomfleet_orthanc_name", entry.name))
        group = str(entry.vars.get("dicomfleet_cluster") or entry.name)
        key = (uri, name)
        if key in seen and seen[key][1] != group:
            report(entry.name, "dicomfleet_orthanc_name",
                   f"{name!r} is also the name of Orthanc on host {seen[key][0]}, which writes to the same "
                   "MongoDB; give each region's Orthanc its own name")
        seen.setdefault(key, (entry.name, group))


def _validate_ports(raw: RawInventory, report: Callable[[str, str, str], None]) -> None:
    """Report two services of one host that would listen on the same port."""
    for entry in raw.hosts.values():
        data = entry.vars
        listeners: dict[int, str] = {}

        def claim(port: Any, variable: str) -> None:
            if not isinstance(port, int):
                return
            if port in listeners:
                report(entry.name, variable, f"port {port} is also {listeners[port]}; give each service "
                       "of a host its own port")
            listeners.setdefault(port, variable)

        if CENTRAL_GROUP in entry.groups:
            claim(data.get("dicomfleet_orthanc_http_port", 8042), "dicomfleet_orthanc_http_port")
            claim(data.get("dicomfleet_orthanc_dicom_port", 4242), "dicomfleet_orthanc_dicom_port")
            claim(data.get("dicomfleet_dashboard_port", rollout.DEFAULT_PORT), "dicomfleet_dashboard_port")
            if data.get("dicomfleet_tls", True):
                claim(data.get("dicomfleet_https_port", 443), "dicomfleet_https_port")
                claim(data.get("dicomfleet_dashboard_https_port", rollout.DEFAULT_HTTPS_PORT),
                      "dicomfleet_dashboard_https_port")
        for other in raw.hosts.values():
            if other.vars.get("dicomfleet_cluster_balancer") == entry.name \
                    and CENTRAL_GROUP in other.groups and other.vars.get("dicomfleet_cluster"):
                claim(other.vars.get("dicomfleet_cluster_https_port", cluster.DEFAULT_BALANCER_PORT),
                      "dicomfleet_cluster_https_port")
                break


def _validate_dashboard_bind(central: list, report: Callable[[str, str, str], None]) -> None:
    """Report a dashboard that would serve plain HTTP to the network on a host where nginx serves it over TLS."""
    for entry in central:
        bind = entry.vars.get("dicomfleet_dashboard_bind")
        if bind is None or not entry.vars.get("dicomfleet_tls", True) or not isinstance(bind, str):
            continue
        if not is_loopback(bind):
            report(entry.name, "dicomfleet_dashboard_bind",
                   f"{bind!r} is not a loopback address; with TLS on, nginx serves the dashboard over "
                   "HTTPS on dicomfleet_dashboard_https_port and the dashboard's own plain HTTP listener "
                   "stays on loopback: remove the variable (127.0.0.1) or give a 127.x.x.x address")


def validate(raw: RawInventory, report: Callable[[str, str, str], None]) -> None:
    """Check the rules of RAW that span variables or hosts; call REPORT(host, field, message) for each problem."""
    central = [e for e in raw.hosts.values() if CENTRAL_GROUP in e.groups]
    _validate_tls_files(raw, report)
    cluster.validate(raw.hosts, central, report)
    firewall.validate(raw.hosts, report)
    _validate_regions(central, report)
    _validate_ports(raw, report)
    _validate_dashboard_bind(central, report)
