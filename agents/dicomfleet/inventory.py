"""Load an Ansible-format YAML inventory into dicomfleet's model of a site.

The inventory is the single source of truth for pyinfra, Ansible and every
dicomfleet command. Hosts in the group ``central`` run Orthanc (one per region
or cluster node); every host that carries ``dicomfleet_machine_id`` is an
imaging machine. Nothing here contacts a host.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path
from typing import Any

import yaml

CENTRAL_GROUP = "central"
# Hosts that serve the network shares of `dicomfleet_ingest: share` machines and run their agent.
FILESERVER_GROUP = "fileservers"

INGEST_AGENT = "agent"
INGEST_SHARE = "share"
INGEST_DICOM = "dicom"

TRANSPORT_REST = "rest"
TRANSPORT_CSTORE = "cstore"


class InventoryError(Exception):
    """Raised when an inventory cannot be read or breaks a validation rule."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclasses.dataclass
class HostEntry:
    """One host of the inventory with its variables merged from all its groups."""

    name: str
    groups: list[str]
    vars: dict[str, Any]


@dataclasses.dataclass
class RawInventory:
    """The inventory file as read, before validation."""

    path: Path
    hosts: dict[str, HostEntry]


@dataclasses.dataclass(frozen=True)
class OrthancServer:
    """A central host running Orthanc and, by default, the sync service."""

    host: str
    name: str
    address: str
    aet: str
    http_port: int
    dicom_port: int
    mongodb_uri: str
    mongodb_port: int
    vars: dict[str, Any] = dataclasses.field(compare=False, repr=False)

    @property
    def embedded_mongodb(self) -> bool:
        """True when this host runs the embedded MongoDB-compatible server."""
        return not self.mongodb_uri

    @property
    def url(self) -> str:
        """Orthanc's REST base URL as the machines reach it."""
        return f"http://{self.address}:{self.http_port}"

    @property
    def effective_mongodb_uri(self) -> str:
        """The MongoDB URI the sync writes to."""
        if self.mongodb_uri:
            return self.mongodb_uri
        return f"mongodb://{self.address}:{self.mongodb_port}/"


@dataclasses.dataclass(frozen=True)
class Machine:
    """An imaging machine: a scanner, an X-ray room or a workstation."""

    host: str
    id: str
    ae_title: str
    modality: str
    location: str
    ingest: str
    transport: str
    address: str
    watch_folders: tuple[str, ...]
    orthanc: str
    vars: dict[str, Any] = dataclasses.field(compare=False, repr=False)

    @property
    def runs_agent(self) -> bool:
        """True when the agent is deployed on this machine's own host."""
        return self.ingest == INGEST_AGENT

    @property
    def agent_host(self) -> str | None:
        """The inventory host whose agent sends this machine's files: its own, its file server's, or None."""
        if self.ingest == INGEST_AGENT:
            return self.host
        if self.ingest == INGEST_SHARE:
            return str(self.vars.get("dicomfleet_share_host", "")) or None
        return None

    @property
    def orthanc_username(self) -> str:
        """The machine's own Orthanc HTTP user."""
        return self.id


@dataclasses.dataclass
class Site:
    """A validated inventory: the Orthanc servers and the machines that feed them."""

    name: str
    path: Path
    servers: dict[str, OrthancServer]
    machines: dict[str, Machine]
    hosts: dict[str, HostEntry]
    vars: dict[str, Any]

    def machines_of(self, server: OrthancServer) -> list[Machine]:
        """Return the machines that send to SERVER, in inventory order.

        The nodes of one cluster (the same ``dicomfleet_cluster``) share their
        machines, because any node may receive any machine's images.
        """
        targets = {server.host}
        cluster = server.vars.get("dicomfleet_cluster")
        if cluster:
            targets = {s.host for s in self.servers.values() if s.vars.get("dicomfleet_cluster") == cluster}
        return [m for m in self.machines.values() if m.orthanc in targets]

    def server_of(self, machine: Machine) -> OrthancServer:
        """Return the Orthanc server MACHINE sends to."""
        return self.servers[machine.orthanc]


def is_loopback(address: str) -> bool:
    """Return True when ADDRESS is a loopback IP address or the name localhost."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _merge_group(
    path: Path,
    group_name: str,
    group: Any,
    inherited: dict[str, Any],
    parents: list[str],
    hosts: dict[str, HostEntry],
) -> None:
    if group is None:
        group = {}
    if not isinstance(group, dict):
        raise InventoryError(
            [f"{path}: group {group_name!r} must be a mapping with 'hosts', 'vars' "
             f"or 'children', not {type(group).__name__}."]
        )

    group_vars = dict(inherited)
    group_vars.update(group.get("vars") or {})
    groups = parents + [group_name]

    for host_name, host_vars in (group.get("hosts") or {}).items():
        host_name = str(host_name)
        if host_vars is not None and not isinstance(host_vars, dict):
            raise InventoryError(
                [f"{path}: host {host_name!r} must map to a mapping of variables, "
                 f"not {type(host_vars).__name__}."]
            )
        entry = hosts.get(host_name)
        if entry is None:
            entry = HostEntry(name=host_name, groups=[], vars={})
            hosts[host_name] = entry
        merged = dict(group_vars)
        merged.update(entry.vars)
        merged.update(host_vars or {})
        entry.vars = merged
        for name in groups:
            if name not in entry.groups:
                entry.groups.append(name)

    for child_name, child in (group.get("children") or {}).items():
        _merge_group(path, str(child_name), child, group_vars, groups, hosts)


def read_inventory(path: str | os.PathLike) -> RawInventory:
    """Read the YAML inventory at PATH without validating its content."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InventoryError([f"{path}: cannot read the inventory: {error.strerror}."]) from error

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InventoryError([f"{path}: invalid YAML: {error}"]) from error

    if not isinstance(document, dict) or "all" not in document:
        raise InventoryError(
            [f"{path}: an inventory is a YAML mapping with a top-level 'all' group "
             "(Ansible's YAML inventory format)."]
        )

    hosts: dict[str, HostEntry] = {}
    _merge_group(path, "all", document["all"], {}, [], hosts)
    return RawInventory(path=path, hosts=hosts)


def _build_site(raw: RawInventory) -> Site:
    servers: dict[str, OrthancServer] = {}
    machines: dict[str, Machine] = {}
    site_vars: dict[str, Any] = {}

    for entry in raw.hosts.values():
        data = entry.vars
        site_vars.setdefault("dicomfleet_site", data.get("dicomfleet_site", raw.path.stem))
        address = str(data.get("ansible_host", entry.name))

        if CENTRAL_GROUP in entry.groups:
            servers[entry.name] = OrthancServer(
                host=entry.name,
                name=str(data.get("dicomfleet_orthanc_name", entry.name)),
                address=address,
                aet=str(data.get("dicomfleet_orthanc_aet", "ORTHANC")),
                http_port=int(data.get("dicomfleet_orthanc_http_port", 8042)),
                dicom_port=int(data.get("dicomfleet_orthanc_dicom_port", 4242)),
                mongodb_uri=str(data.get("dicomfleet_mongodb_uri") or ""),
                mongodb_port=int(data.get("dicomfleet_mongodb_port", 27017)),
                vars=data,
            )

    only_server = next(iter(servers)) if len(servers) == 1 else None
    for entry in raw.hosts.values():
        data = entry.vars
        if "dicomfleet_machine_id" not in data:
            continue
        machine_id = str(data["dicomfleet_machine_id"])
        machines[machine_id] = Machine(
            host=entry.name,
            id=machine_id,
            ae_title=str(data["dicomfleet_ae_title"]).strip(),
            modality=str(data["dicomfleet_modality"]),
            location=str(data.get("dicomfleet_location", "")),
            ingest=str(data.get("dicomfleet_ingest", INGEST_AGENT)),
            transport=str(data.get("dicomfleet_transport", TRANSPORT_REST)),
            address=str(data.get("ansible_host", entry.name)),
            watch_folders=tuple(str(f) for f in data.get("dicomfleet_watch_folders") or ()),
            orthanc=str(data.get("dicomfleet_orthanc") or only_server),
            vars=data,
        )

    return Site(
        name=str(site_vars.get("dicomfleet_site", raw.path.stem)),
        path=raw.path,
        servers=servers,
        machines=machines,
        hosts=raw.hosts,
        vars=site_vars,
    )


def load_site(path: str | os.PathLike) -> Site:
    """Read, validate and model the inventory at PATH.

    Raises InventoryError listing every problem found, before any host is
    contacted.
    """
    from dicomfleet import validation

    raw = read_inventory(path)
    problems = validation.validate(raw)
    if problems:
        raise InventoryError(problems)
    return _build_site(raw)
