"""Orthanc clusters: several central hosts sharing one PostgreSQL index and one storage folder.

Central hosts that set the same ``dicomfleet_cluster`` are the nodes of one cluster.
They share the PostgreSQL database on ``dicomfleet_postgresql_host`` (the plugin's
``Lock`` is false so all nodes write to it) and the storage folder, which the site
mounts on every node (NFS or similar). nginx on ``dicomfleet_cluster_balancer``
spreads REST requests over the nodes. The first node in inventory order is the
primary: it alone runs the sync, which reads the shared change feed, and the backups.
"""

from __future__ import annotations

import dataclasses

from dicomfleet.inventory import OrthancServer, Site

POSTGRESQL_USER = "orthanc"
DEFAULT_POSTGRESQL_PORT = 5432
DEFAULT_BALANCER_PORT = 443
# Debian bookworm's PostgreSQL major version, which names its configuration folder.
POSTGRESQL_VERSION = "15"

# Variables that every node of one cluster must set to the same value.
SHARED_VARIABLES = (
    "dicomfleet_cluster_balancer",
    "dicomfleet_cluster_https_port",
    "dicomfleet_postgresql_host",
    "dicomfleet_postgresql_port",
    "dicomfleet_postgresql_database",
    "dicomfleet_orthanc_storage_directory",
    "dicomfleet_mongodb_uri",
)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The nodes of one Orthanc cluster and the hosts that serve them."""

    name: str
    nodes: tuple[str, ...]
    balancer: str
    balancer_address: str
    balancer_port: int
    postgresql_host: str
    postgresql_address: str
    postgresql_port: int
    # Empty: the database is named after the cluster's role.
    database: str

    @property
    def primary(self) -> str:
        """The node that runs the sync and the backups: the first in inventory order."""
        return self.nodes[0]

    @property
    def url(self) -> str:
        """The balancer's HTTPS URL, which agents and viewers use."""
        return f"https://{_url_host(self.balancer_address)}:{self.balancer_port}"

    @property
    def verify_name(self) -> str:
        """The DNS name every node's certificate carries, which the balancer checks."""
        return f"{self.name}.orthanc-cluster.internal"

    @property
    def password_secret(self) -> str:
        """The file name of the PostgreSQL password among the site's secrets."""
        return f"postgresql-{self.name}.password"


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _address(site: Site, host: str) -> str:
    return str(site.hosts[host].vars.get("ansible_host", host))


def clusters(site: Site) -> dict[str, Cluster]:
    """Return SITE's clusters by name; cluster-wide settings come from the first node."""
    nodes_by_name: dict[str, list[OrthancServer]] = {}
    for server in site.servers.values():
        name = server.vars.get("dicomfleet_cluster")
        if name:
            nodes_by_name.setdefault(str(name), []).append(server)

    found = {}
    for name, nodes in nodes_by_name.items():
        data = nodes[0].vars
        balancer = str(data["dicomfleet_cluster_balancer"])
        postgresql_host = str(data["dicomfleet_postgresql_host"])
        found[name] = Cluster(
            name=name,
            nodes=tuple(node.host for node in nodes),
            balancer=balancer,
            balancer_address=_address(site, balancer),
            balancer_port=int(data.get("dicomfleet_cluster_https_port", DEFAULT_BALANCER_PORT)),
            postgresql_host=postgresql_host,
            postgresql_address=_address(site, postgresql_host),
            postgresql_port=int(data.get("dicomfleet_postgresql_port", DEFAULT_POSTGRESQL_PORT)),
            database=str(data.get("dicomfleet_postgresql_database", "")),
        )
    return found


def cluster_of(site: Site, host: str) -> Cluster | None:
    """Return the cluster whose node is HOST, or None for a standalone server."""
    for cluster in clusters(site).values():
        if host in cluster.nodes:
            return cluster
    return None


def is_secondary(site: Site, host: str) -> bool:
    """Return True when HOST is a cluster node other than the primary."""
    cluster = cluster_of(site, host)
    return cluster is not None and cluster.primary != host


def balancer_hosts(site: Site) -> dict[str, list[Cluster]]:
    """Return the inventory hosts that balance clusters, each with its clusters."""
    hosts: dict[str, list[Cluster]] = {}
    for cluster in clusters(site).values():
        hosts.setdefault(cluster.balancer, []).append(cluster)
    return hosts


def postgresql_hosts(site: Site) -> dict[str, list[Cluster]]:
    """Return the inventory hosts that run PostgreSQL, each with the clusters it serves."""
    hosts: dict[str, list[Cluster]] = {}
    for cluster in clusters(site).values():
        hosts.setdefault(cluster.postgresql_host, []).append(cluster)
    return hosts


def service_hosts(site: Site) -> list[str]:
    """Return the hosts that serve clusters (balancers, PostgreSQL) and are not central hosts."""
    hosts = []
    for cluster in clusters(site).values():
        for host in (cluster.postgresql_host, cluster.balancer):
            if host not in site.servers and host not in hosts:
                hosts.append(host)
    return hosts


def validate(site_hosts: dict, central: list, report) -> None:
    """Check the cluster variables of the inventory's CENTRAL hosts; call REPORT(host, field, message).

    SITE_HOSTS maps every inventory host name to its entry.
    """
    nodes_by_name: dict[str, list] = {}
    for entry in central:
        name = entry.vars.get("dicomfleet_cluster")
        if name:
            nodes_by_name.setdefault(str(name), []).append(entry)

    for name, nodes in nodes_by_name.items():
        first = nodes[0]
        for field in ("dicomfleet_cluster_balancer", "dicomfleet_postgresql_host"):
            target = first.vars.get(field)
            if target is None:
                report(first.name, field, f"missing; every node of cluster {name!r} needs it")
            elif str(target) not in site_hosts:
                report(first.name, field, f"{target!r} is not a host of the inventory; add the host "
                       "that runs it (any group) and name it here")

        if "dicomfleet_orthanc_storage_directory" not in first.vars:
            report(first.name, "dicomfleet_orthanc_storage_directory",
                   f"missing; the nodes of cluster {name!r} share one storage folder, which the site "
                   "mounts on every node, so name it")

        for node in nodes[1:]:
            for field in SHARED_VARIABLES:
                if node.vars.get(field) != first.vars.get(field):
                    report(node.name, field, f"{node.vars.get(field)!r} differs from {first.vars.get(field)!r} "
                           f"on node {first.name}; every node of cluster {name!r} needs the same value")
