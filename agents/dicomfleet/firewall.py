"""nftables rules for the hosts the archive runs on, computed from the inventory.

Each rule opens one TCP port to the addresses that need it: the DICOM port to the
machines registered for C-STORE, HTTPS to the agents' hosts, the viewer networks
and a cluster's balancer, PostgreSQL to the cluster's nodes. Everything else that
arrives from the network is dropped; loopback stays open, so Orthanc's plain HTTP
port is reached only from the host itself.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Callable, Iterable

from dicomfleet import cluster as clusters
from dicomfleet.inventory import (
    CENTRAL_GROUP,
    INGEST_AGENT,
    INGEST_DICOM,
    INGEST_SHARE,
    TRANSPORT_CSTORE,
    Machine,
    OrthancServer,
    Site,
    is_loopback,
)
from dicomfleet.dashboard import rollout

RULES_PATH = "/etc/dicomfleet/firewall.nft"
UNIT = "dicomfleet-firewall.service"
# The nftables package's own unit, which dicomfleet leaves disabled but sandboxes.
DEBIAN_UNIT_DROP_IN = "/etc/systemd/system/nftables.service.d/dicomfleet-hardening.conf"
TABLE = "dicomfleet"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One TCP port opened to a list of sources, with the reason in words."""

    port: int
    service: str
    sources: tuple[str, ...]
    reason: str
    # True opens the port to every address (SSH when no admin network is listed).
    any_source: bool = False

    @property
    def ipv4(self) -> list[str]:
        """The IPv4 addresses and networks among the sources."""
        return [s for s in self.sources if ipaddress.ip_network(s, strict=False).version == 4]

    @property
    def ipv6(self) -> list[str]:
        """The IPv6 addresses and networks among the sources."""
        return [s for s in self.sources if ipaddress.ip_network(s, strict=False).version == 6]

    @property
    def set_name(self) -> str:
        """The nftables set name of this rule's sources, without the address family suffix."""
        return f"port_{self.port}"


def enabled(site: Site, host: str) -> bool:
    """Return True when the deploy puts firewall rules on HOST (``dicomfleet_firewall``, default true)."""
    return bool(site.hosts[host].vars.get("dicomfleet_firewall", True))


def applied(site: Site, host: str) -> bool:
    """Return True when the deploy loads HOST's rules into the kernel.

    Lab hosts share the control machine's network namespace, so loading rules
    there would change the control machine's own firewall: the lab gets the
    rules file and its syntax check only.
    """
    return enabled(site, host) and not site.hosts[host].vars.get("dicomfleet_lab", False)


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    seen: list[str] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return tuple(seen)


def sends_dicom(machine: Machine) -> bool:
    """Return True when MACHINE reaches Orthanc over DICOM (C-STORE from the machine or its agent)."""
    return machine.ingest == INGEST_DICOM or machine.transport == TRANSPORT_CSTORE


def sends_rest(machine: Machine) -> bool:
    """Return True when MACHINE's agent reaches Orthanc over its REST API."""
    return machine.ingest in (INGEST_AGENT, INGEST_SHARE) and machine.transport != TRANSPORT_CSTORE


def agent_address(site: Site, machine: Machine) -> str:
    """Return the address MACHINE's REST uploads and heartbeats come from: its agent's host.

    A share machine's agent runs on its file server; a machine without an agent
    sends from its own address.
    """
    host = machine.agent_host
    if host is None or host == machine.host:
        return machine.address
    return str(site.hosts[host].vars.get("ansible_host", host))


def _networks(site: Site, host: str, variable: str) -> list[str]:
    return [str(value) for value in site.hosts[host].vars.get(variable) or []]


def _ssh_rule(site: Site, host: str) -> Rule:
    port = int(site.hosts[host].vars.get("ansible_port", 22))
    admin = _networks(site, host, "dicomfleet_admin_networks")
    if admin:
        return Rule(port, "SSH", tuple(admin), "administration and deploys from the admin networks")
    # NOTE: without dicomfleet_admin_networks SSH stays open to every address,
    # because closing it would lock the deploy out of the host.
    return Rule(port, "SSH", (), "administration and deploys (no admin network listed, so every address)",
                any_source=True)


def _server_rules(site: Site, server: OrthancServer) -> list[Rule]:
    data = server.vars
    machines = site.machines_of(server)
    viewers = _networks(site, server.host, "dicomfleet_viewer_networks")
    admin = _networks(site, server.host, "dicomfleet_admin_networks")
    rules = []

    dicom_senders = _unique(agent_address(site, m) for m in machines if sends_dicom(m))
    rules.append(Rule(server.dicom_port, "DICOM to Orthanc", dicom_senders,
                      "C-STORE from the machines registered for DICOM"))

    rest_senders = list(_unique(agent_address(site, m) for m in machines if sends_rest(m)))
    senders = "REST uploads from the agents' hosts"
    cluster = clusters.cluster_of(site, server.host)
    if cluster is not None:
        # Agents reach a cluster through its balancer; the node only hears the balancer.
        rest_senders = [cluster.balancer_address]
        senders = "requests from the cluster's load balancer"
    if data.get("dicomfleet_tls", True):
        # The control machine on the admin networks runs dicomfleet check and status over HTTPS.
        https_port = int(data.get("dicomfleet_https_port", 443))
        rules.append(Rule(https_port, "HTTPS to nginx in front of Orthanc", _unique([*rest_senders, *viewers, *admin]),
                          f"{senders}, browsers on the viewer networks, and the admin networks"))
    else:
        rules.append(Rule(server.http_port, "HTTP to Orthanc without TLS", _unique([*rest_senders, *viewers]),
                          f"{senders}, and browsers on the viewer networks"))

    agents = _unique(agent_address(site, m) for m in machines if m.agent_host)
    if rollout.behind_tls(server):
        rules.append(Rule(rollout.dashboard_https_port(server), "HTTPS to nginx in front of the dashboard",
                          _unique([*agents, *viewers, *admin]),
                          "heartbeats from the agents' hosts, browsers on the viewer networks, and the admin networks"))
    elif not is_loopback(rollout.listen_address(server)):
        rules.append(Rule(rollout.dashboard_port(server), "HTTP to the dashboard without TLS",
                          _unique([*agents, *viewers]),
                          "heartbeats from the agents' hosts, and browsers on the viewer networks"))

    bind = str(data.get("dicomfleet_mongodb_bind", "127.0.0.1"))
    if server.embedded_mongodb and not is_loopback(bind) \
            and not clusters.is_secondary(site, server.host):
        writers = [s.address for s in site.servers.values()
                   if s.host != server.host and bind in s.mongodb_uri]
        rules.append(Rule(server.mongodb_port, "MongoDB to the embedded server", _unique([*writers, *viewers]),
                          "the syncs of other regions and the viewer networks"))
    return rules


def rules_for(site: Site, host: str) -> list[Rule]:
    """Return the rules of HOST: every port it serves to the network, with its sources."""
    rules = [_ssh_rule(site, host)]
    if host in site.servers:
        rules.extend(_server_rules(site, site.servers[host]))

    for cluster in clusters.balancer_hosts(site).get(host, []):
        machines = [m for node in cluster.nodes for m in site.machines_of(site.servers[node])]
        viewers = _networks(site, host, "dicomfleet_viewer_networks")
        rest_senders = _unique(agent_address(site, m) for m in machines if sends_rest(m))
        rules.append(Rule(cluster.balancer_port, f"HTTPS to nginx balancing cluster {cluster.name}",
                          _unique([*rest_senders, *viewers]),
                          "REST uploads from the cluster's agents, and browsers on the viewer networks"))

    for cluster in clusters.postgresql_hosts(site).get(host, []):
        nodes = _unique(site.servers[node].address for node in cluster.nodes)
        rules.append(Rule(cluster.postgresql_port, f"PostgreSQL with the index of cluster {cluster.name}", nodes,
                          "the Orthanc nodes of the cluster"))

    return _merge_same_port(rules)


def _merge_same_port(rules: list[Rule]) -> list[Rule]:
    merged: dict[int, Rule] = {}
    for rule in rules:
        if rule.port not in merged:
            merged[rule.port] = rule
            continue
        earlier = merged[rule.port]
        merged[rule.port] = Rule(rule.port, f"{earlier.service}; {rule.service}",
                                 _unique([*earlier.sources, *rule.sources]),
                                 f"{earlier.reason}; {rule.reason}", earlier.any_source or rule.any_source)
    return list(merged.values())


def firewall_hosts(site: Site) -> list[str]:
    """Return the hosts that get firewall rules: central hosts and the hosts serving clusters."""
    hosts = list(site.servers)
    for host in clusters.service_hosts(site):
        if host not in hosts:
            hosts.append(host)
    return [host for host in hosts if enabled(site, host)]


def validate(hosts: dict, report: Callable[[str, str, str], None]) -> None:
    """Report machines without an IP address whose central host has a firewall.

    nftables sets hold addresses, so a host name cannot be a source. HOSTS maps
    every inventory host name to its entry; REPORT takes (host, field, message).
    """
    central = {name: entry for name, entry in hosts.items() if CENTRAL_GROUP in entry.groups}
    with_firewall = {name for name, entry in central.items() if entry.vars.get("dicomfleet_firewall", True)}
    if not with_firewall:
        return

    for entry in hosts.values():
        if "dicomfleet_machine_id" not in entry.vars:
            continue
        target = entry.vars.get("dicomfleet_orthanc")
        if target is None and len(central) == 1:
            target = next(iter(central))
        if target not in with_firewall:
            continue

        # A share machine's files come from its file server, so that host's address is the source.
        source = entry
        if entry.vars.get("dicomfleet_ingest") == INGEST_SHARE and entry.vars.get("dicomfleet_share_host") in hosts:
            source = hosts[entry.vars["dicomfleet_share_host"]]
        address = str(source.vars.get("ansible_host", source.name))
        try:
            ipaddress.ip_address(address)
        except ValueError:
            report(source.name, "ansible_host",
                   f"{address!r} is a host name, but the firewall of {target} lists sources by IP "
                   "address; give the host's IP address or set dicomfleet_firewall: false on "
                   f"{target}")
