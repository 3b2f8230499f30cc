"""The site's network plan: a Markdown page rendered from the inventory for the network team.

It lists the imaging VLAN and subnet, each server's and machine's address, AE
title, ingest path and ports, every firewall rule in words, and the checks to run
after a change. ``dicomfleet render`` writes it with each central host's files.
"""

from __future__ import annotations

import ipaddress

from dicomfleet import cluster as clusters
from dicomfleet import firewall, proxy, render
from dicomfleet.inventory import INGEST_DICOM, Machine, Site


def _subnet(site: Site) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    value = site.vars.get("dicomfleet_imaging_subnet") or _site_variable(site, "dicomfleet_imaging_subnet")
    return ipaddress.ip_network(str(value), strict=False) if value else None


def _site_variable(site: Site, name: str):
    """Return NAME from the first host that sets it (site-wide variables live on the ``all`` group)."""
    for entry in site.hosts.values():
        if name in entry.vars:
            return entry.vars[name]
    return None


def _in_subnet(address: str, subnet) -> str:
    if subnet is None:
        return "-"
    try:
        return "yes" if ipaddress.ip_address(address) in subnet else "no"
    except ValueError:
        return "host name"


def _labels(site: Site) -> dict[str, list[str]]:
    """Return the names behind each address: machines, central hosts and cluster service hosts."""
    labels: dict[str, list[str]] = {}

    def add(address: str, label: str) -> None:
        names = labels.setdefault(address, [])
        if label not in names:
            names.append(label)

    for machine in site.machines.values():
        add(machine.address, machine.id)
        if machine.agent_host and machine.agent_host != machine.host:
            add(firewall.agent_address(site, machine), machine.agent_host)
    for server in site.servers.values():
        add(server.address, server.host)
    for host in clusters.service_hosts(site):
        add(str(site.hosts[host].vars.get("ansible_host", host)), host)
    return labels


def describe_rule(site: Site, host: str, rule: firewall.Rule, labels: dict[str, list[str]]) -> str:
    """Return RULE of HOST as one sentence for people."""
    if rule.any_source:
        return f"TCP {rule.port}, {rule.service}, from any address: {rule.reason}."
    if not rule.sources:
        return f"TCP {rule.port}, {rule.service}, stays closed: the inventory lists no source for it."

    viewers = [str(n) for n in site.hosts[host].vars.get("dicomfleet_viewer_networks") or []]
    admins = [str(n) for n in site.hosts[host].vars.get("dicomfleet_admin_networks") or []]
    sources = []
    for source in rule.sources:
        names = list(labels.get(source, []))
        if source in viewers:
            names.append("viewer network")
        if source in admins:
            names.append("admin network")
        sources.append(f"{source} ({', '.join(names)})" if names else source)
    return f"TCP {rule.port}, {rule.service}, from {', '.join(sources)}: {rule.reason}."


def _server_role(site: Site, host: str) -> str:
    roles = []
    cluster = clusters.cluster_of(site, host)
    if host in site.servers:
        if cluster is None:
            roles.append("Orthanc server")
        elif cluster.primary == host:
            roles.append(f"Orthanc node of cluster {cluster.name} (primary: sync and backups)")
        else:
            roles.append(f"Orthanc node of cluster {cluster.name}")
    for balanced in clusters.balancer_hosts(site).get(host, []):
        roles.append(f"load balancer of cluster {balanced.name}")
    for served in clusters.postgresql_hosts(site).get(host, []):
        roles.append(f"PostgreSQL index of cluster {served.name}")
    return "; ".join(roles)


def _target(site: Site, machine: Machine) -> str:
    server = site.server_of(machine)
    via = ""
    if machine.agent_host and machine.agent_host != machine.host:
        via = f" from file server {machine.agent_host} ({firewall.agent_address(site, machine)})"
    if firewall.sends_dicom(machine):
        return f"C-STORE to {server.aet} at {server.address}:{server.dicom_port}{via}"
    return f"REST to {proxy.machine_url(site, machine)}{via}"


def _machine_ports(site: Site, machine: Machine) -> str:
    server = site.server_of(machine)
    if firewall.sends_dicom(machine):
        return f"TCP {server.dicom_port} out"
    cluster = clusters.cluster_of(site, server.host)
    if cluster is not None:
        return f"TCP {cluster.balancer_port} out"
    if proxy.tls_enabled(site, server.host):
        return f"TCP {proxy.https_port(site, server.host)} out"
    return f"TCP {server.http_port} out"


def network_plan_context(site: Site) -> dict:
    """Return the template variables of the site's network plan."""
    subnet = _subnet(site)
    labels = _labels(site)

    servers = []
    for host in [*site.servers, *clusters.service_hosts(site)]:
        address = str(site.hosts[host].vars.get("ansible_host", host))
        server = site.servers.get(host)
        servers.append({
            "host": host,
            "address": address,
            "role": _server_role(site, host),
            "aet": server.aet if server else "-",
            "dicom_port": server.dicom_port if server else "-",
            "https": (proxy.orthanc_https_url(site, server) if server and proxy.tls_enabled(site, host)
                      else "-"),
            "http_port": server.http_port if server else "-",
            "in_subnet": _in_subnet(address, subnet),
        })

    machines = []
    for machine in site.machines.values():
        machines.append({
            "id": machine.id,
            "modality": machine.modality,
            "location": machine.location,
            "address": machine.address,
            "in_subnet": _in_subnet(machine.address, subnet),
            "ae_title": machine.ae_title,
            "ingest": machine.ingest if machine.ingest == INGEST_DICOM else f"{machine.ingest} ({machine.transport})",
            "target": _target(site, machine),
            "ports": _machine_ports(site, machine),
        })

    firewalls = []
    for host in firewall.firewall_hosts(site):
        firewalls.append({
            "host": host,
            "address": str(site.hosts[host].vars.get("ansible_host", host)),
            "applied": firewall.applied(site, host),
            "rules": [describe_rule(site, host, rule, labels) for rule in firewall.rules_for(site, host)],
        })
    without_firewall = [host for host in [*site.servers, *clusters.service_hosts(site)]
                        if not firewall.enabled(site, host)]

    dicom_machines = [m for m in machines if m["target"].startswith("C-STORE")]
    rest_machines = [m for m in machines if m["target"].startswith("REST")]
    return {
        "site": site,
        "vlan": site.vars.get("dicomfleet_imaging_vlan") or _site_variable(site, "dicomfleet_imaging_vlan"),
        "subnet": str(subnet) if subnet else None,
        "servers": servers,
        "all_tls": all(proxy.tls_enabled(site, host) for host in site.servers),
        "machines": machines,
        "firewalls": firewalls,
        "without_firewall": without_firewall,
        "dicom_machine": dicom_machines[0] if dicom_machines else None,
        "rest_machine": rest_machines[0] if rest_machines else None,
        "ca_file": "/etc/dicomfleet/tls/site-ca.pem",
        "rules_path": firewall.RULES_PATH,
        "table": firewall.TABLE,
    }


def render_network_plan(site: Site) -> str:
    """Return the site's network plan as Markdown."""
    return render.render_template("network-plan.md.j2", network_plan_context(site))
