"""Render every file the deploy puts on every host, from the inventory and templates.

pyinfra's deploy.py, the Ansible roles and ``dicomfleet render`` all call
``plan_host``; the Jinja2 templates under ``templates/`` exist once.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import jinja2

from dicomfleet import credentials
from dicomfleet.inventory import (
    INGEST_DICOM,
    INGEST_SHARE,
    TRANSPORT_CSTORE,
    Machine,
    OrthancServer,
    Site,
)

ROLE_CENTRAL = "central"
ROLE_AGENT = "agent"

AGENT_USER = "dicomfleet-agent"
SYNC_USER = "dicomfleet-sync"
MONGODB_USER = "dicomfleet-mongodb"

CREDENTIALS_DIR = "/etc/dicomfleet/credentials"
VENV = "/opt/dicomfleet/venv"
WHEELHOUSE = "/opt/dicomfleet/wheels"


def templates_dir() -> Path:
    """Return the folder of the project's Jinja2 templates."""
    override = os.environ.get("DICOMFLEET_TEMPLATES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "templates"


@dataclasses.dataclass(frozen=True)
class ManagedFile:
    """A file the deploy owns on a host."""

    path: str
    content: str
    mode: str
    owner: str
    group: str
    template: str
    # systemd units to restart when this file changes.
    restarts: tuple[str, ...] = ()
    secret: bool = False


@dataclasses.dataclass(frozen=True)
class ManagedDirectory:
    """A folder the deploy creates on a host."""

    path: str
    mode: str
    owner: str
    group: str


@dataclasses.dataclass(frozen=True)
class RemovedPath:
    """A file or symbolic link the deploy removes from a host, such as a package's default site."""

    path: str
    # systemd units to restart when the path was removed.
    restarts: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ManagedCommand:
    """A shell command the deploy runs on a host after its services are started.

    It runs only when one of the managed files at AFTER_CHANGES changed in this
    deploy, so a second deploy runs nothing. The command line holds no secret.
    """

    name: str
    command: str
    after_changes: tuple[str, ...]


@dataclasses.dataclass
class HostPlan:
    """Everything the deploy puts on one host."""

    host: str
    address: str
    roles: list[str]
    users: list[str] = dataclasses.field(default_factory=list)
    directories: list[ManagedDirectory] = dataclasses.field(default_factory=list)
    files: list[ManagedFile] = dataclasses.field(default_factory=list)
    services: list[str] = dataclasses.field(default_factory=list)
    apt_packages: list[str] = dataclasses.field(default_factory=list)
    needs_venv: bool = False
    removed_paths: list[RemovedPath] = dataclasses.field(default_factory=list)
    commands: list[ManagedCommand] = dataclasses.field(default_factory=list)


@functools.lru_cache(maxsize=4)
def _environment_of(folder: str) -> jinja2.Environment:
    # One environment per folder keeps compiled templates; Jinja2 reloads a template whose file changed.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _environment() -> jinja2.Environment:
    return _environment_of(str(templates_dir()))


def render_template(name: str, context: dict) -> str:
    """Render the template NAME with CONTEXT."""
    return _environment().get_template(name).render(**context)


def orthanc_settings(site: Site, server: OrthancServer) -> dict:
    """Return Orthanc's tuning for SERVER, sized by the machines it serves.

    Each REST agent keeps up to four keep-alive connections, so the HTTP pool
    grows with the fleet; each DICOM sender holds one association at a time.
    """
    from dicomfleet import proxy

    data = server.vars
    machines = site.machines_of(server)
    rest_senders = sum(1 for m in machines if m.agent_host and m.transport != TRANSPORT_CSTORE)
    dicom_senders = len(machines) - rest_senders
    storage = str(data.get("dicomfleet_orthanc_storage_directory", "/var/lib/orthanc/db-v6"))

    return {
        "storage_directory": storage,
        "index_directory": str(data.get("dicomfleet_orthanc_index_directory", storage)),
        "storage_compression": bool(data.get("dicomfleet_orthanc_storage_compression", False)),
        "maximum_storage_mb": int(data.get("dicomfleet_orthanc_maximum_storage_mb", 0)),
        "maximum_patient_count": int(data.get("dicomfleet_orthanc_maximum_patient_count", 0)),
        "plugins": list(data.get("dicomfleet_orthanc_plugins", ["/usr/share/orthanc/plugins"])),
        "concurrent_jobs": int(data.get("dicomfleet_orthanc_concurrent_jobs", 2)),
        "http_threads": int(data.get("dicomfleet_orthanc_http_threads", min(200, max(50, 4 * rest_senders + 10)))),
        "dicom_threads": int(data.get("dicomfleet_orthanc_dicom_threads", min(64, max(4, dicom_senders + 2)))),
        "stable_age": int(data.get("dicomfleet_orthanc_stable_age", 60)),
        # Behind nginx every request reaches Orthanc from 127.0.0.1, so Orthanc itself
        # refuses plain HTTP from any other address, firewall or not.
        "remote_access_allowed": bool(data.get("dicomfleet_orthanc_remote_access",
                                               not proxy.tls_enabled(site, server.host))),
    }


def orthanc_users(site: Site, server: OrthancServer, secrets: credentials.SiteSecrets) -> list[dict]:
    """Return Orthanc's HTTP users for SERVER: one per machine, the sync, the dashboard and an admin."""
    users = []
    for machine in site.machines_of(server):
        if machine.ingest == INGEST_DICOM:
            continue
        users.append({"name": machine.orthanc_username,
                      "password": secrets.orthanc_password(machine.orthanc_username)})
    for name in (credentials.SYNC_USER, credentials.DASHBOARD_USER, credentials.ADMIN_USER):
        users.append({"name": name, "password": secrets.orthanc_password(name)})
    return users


def _as_dicom_sender(site: Site, machine: Machine) -> Machine:
    """Return MACHINE with the address its C-STOREs come from: a share machine's file server sends them."""
    if machine.ingest != INGEST_SHARE or not machine.agent_host or machine.agent_host not in site.hosts:
        return machine
    address = str(site.hosts[machine.agent_host].vars.get("ansible_host", machine.agent_host))
    return dataclasses.replace(machine, address=address)


def server_context(site: Site, server: OrthancServer, secrets: credentials.SiteSecrets) -> dict:
    """Return the template variables of a central host."""
    from dicomfleet import cluster, proxy

    data = server.vars
    machines = site.machines_of(server)
    # A study whose last images reached a cluster node that then stopped never becomes
    # stable on any node, so only a reconcile records it: clusters reconcile more often.
    reconcile_default = 60 if cluster.cluster_of(site, server.host) is not None else 900
    mongodb_bind = str(data.get("dicomfleet_mongodb_bind", "127.0.0.1"))
    if server.embedded_mongodb:
        mongodb_uri = f"mongodb://{mongodb_bind}:{server.mongodb_port}/"
    else:
        mongodb_uri = server.mongodb_uri

    return {
        "site": site,
        "host": server.host,
        "server": server,
        "orthanc": orthanc_settings(site, server),
        "orthanc_users": orthanc_users(site, server, secrets),
        "orthanc_public_url": str(data.get("dicomfleet_orthanc_public_url", proxy.public_url(site, server))),
        "dicom_machines": [_as_dicom_sender(site, m) for m in machines
                           if m.ingest == INGEST_DICOM or m.transport == TRANSPORT_CSTORE],
        "machines": machines,
        # The sync names a C-STORE's machine by its AE title and the address it came from.
        "sync_machines": [_as_dicom_sender(site, m) for m in machines],
        "sync_user": credentials.SYNC_USER,
        "mongodb_bind": mongodb_bind,
        "mongodb_uri": mongodb_uri,
        "mongodb_database": str(data.get("dicomfleet_mongodb_database", "dicomfleet")),
        "patient_id_policy": str(data.get("dicomfleet_patient_id_policy", "dicom")),
        "patient_id_placeholder": str(data.get("dicomfleet_patient_id_placeholder", "NA")),
        "records_on_delete": str(data.get("dicomfleet_records_on_delete", "mark")),
        "sync_reconcile_interval_s": int(data.get("dicomfleet_sync_reconcile_interval_s", reconcile_default)),
    }


def sync_machine_directory(site: Site, server: OrthancServer, secrets: credentials.SiteSecrets):
    """Return SERVER's machines as its sync reads them from the rendered sync.toml, indexed to name sources.

    The demo, ``dicomfleet check`` and the tests name an instance's machine with it, as the sync does.
    """
    from dicomfleet.sync import config as sync_config
    from dicomfleet.sync import provenance

    text = render_template("sync.toml.j2", server_context(site, server, secrets))
    machines = sync_config.parse_config(text, Path("/etc/dicomfleet/sync.toml")).machines
    return provenance.MachineDirectory(machines)


def agent_context(site: Site, host: str, machines: list[Machine]) -> dict:
    """Return the template variables of a host that runs the agent for MACHINES."""
    data = site.hosts[host].vars
    folders: list[str] = []
    archive_folders: list[str] = []
    for machine in machines:
        for folder in machine.watch_folders:
            if folder not in folders:
                folders.append(folder)
        archive = machine.vars.get("dicomfleet_archive_folder")
        if archive and machine.vars.get("dicomfleet_after_send") == "archive" and archive not in archive_folders:
            archive_folders.append(str(archive))

    return {
        "site": site,
        "host": host,
        "machines": machines,
        "watch_folders": folders,
        # Folders the agent moves sent files to (after_send = "archive").
        "archive_folders": archive_folders,
        "agent": {
            "rescan_interval_s": int(data.get("dicomfleet_agent_rescan_interval_s", 60)),
            "quiet_time_s": float(data.get("dicomfleet_agent_quiet_time_s", 2.0)),
            "workers": int(data.get("dicomfleet_agent_workers", 4)),
        },
        "heartbeat": _heartbeat_settings(site, data, machines),
        "rest": _rest_targets(site, machines),
    }


def _rest_targets(site: Site, machines: list[Machine]) -> dict[str, dict]:
    """Return, per machine id, the REST URL its agent sends to and the CA file that verifies it over HTTPS."""
    from dicomfleet import proxy, tls

    targets = {}
    for machine in machines:
        url = proxy.machine_url(site, machine)
        targets[machine.id] = {"url": url, "ca_file": tls.CA_FILE if url.startswith("https://") else None}
    return targets


def heartbeat_url(site: Site, machines: list[Machine]) -> str | None:
    """Return the heartbeat URL of the agent of MACHINES: the dashboard of their Orthanc server; None without machines."""
    from dicomfleet.dashboard import rollout

    if not machines:
        return None
    # NOTE: an agent whose machines send to several Orthanc servers reports to the first one's dashboard only.
    return rollout.dashboard_url(site.server_of(machines[0])) + rollout.HEARTBEAT_API


def _heartbeat_settings(site: Site, data: dict, machines: list[Machine]) -> dict | None:
    """Return where and how often the agent of MACHINES sends heartbeats, with the CA file for HTTPS."""
    from dicomfleet import tls

    url = heartbeat_url(site, machines)
    if url is None:
        return None
    return {
        "url": url,
        "ca_file": tls.CA_FILE if url.startswith("https://") else None,
        "interval_s": float(data.get("dicomfleet_heartbeat_interval_s", 30)),
    }


def _root_file(path: str, content: str, template: str, restarts: tuple[str, ...] = (),
               mode: str = "0644", group: str = "root", secret: bool = False) -> ManagedFile:
    return ManagedFile(path=path, content=content, mode=mode, owner="root", group=group,
                       template=template, restarts=restarts, secret=secret)


def _plan_central(plan: HostPlan, site: Site, server: OrthancServer,
                  secrets: credentials.SiteSecrets) -> None:
    context = server_context(site, server, secrets)
    plan.roles.append(ROLE_CENTRAL)
    plan.needs_venv = True
    plan.apt_packages.append("orthanc")
    plan.users.append(SYNC_USER)
    plan.directories.append(ManagedDirectory("/etc/dicomfleet", "0755", "root", "root"))
    plan.directories.append(ManagedDirectory(CREDENTIALS_DIR, "0700", "root", "root"))

    orthanc_restart = ("orthanc.service",)
    plan.files.append(_root_file("/etc/orthanc/orthanc.json",
                                 render_template("orthanc.json.j2", context),
                                 "orthanc.json.j2", orthanc_restart))
    plan.files.append(_root_file("/etc/orthanc/credentials.json",
                                 render_template("orthanc-credentials.json.j2", context),
                                 "orthanc-credentials.json.j2", orthanc_restart,
                                 mode="0640", group="orthanc", secret=True))

    sync_restart = ("dicomfleet-sync.service",)
    plan.files.append(_root_file("/etc/dicomfleet/sync.toml",
                                 render_template("sync.toml.j2", context),
                                 "sync.toml.j2", sync_restart))
    plan.files.append(_root_file(f"{CREDENTIALS_DIR}/orthanc-sync.password",
                                 secrets.orthanc_password(credentials.SYNC_USER) + "\n",
                                 "", sync_restart, mode="0600", secret=True))
    plan.files.append(_root_file("/etc/systemd/system/dicomfleet-sync.service",
                                 render_template("dicomfleet-sync.service.j2", context),
                                 "dicomfleet-sync.service.j2", sync_restart))

    if server.embedded_mongodb:
        plan.users.append(MONGODB_USER)
        mongodb_restart = ("dicomfleet-mongodb.service",)
        plan.files.append(_root_file("/etc/systemd/system/dicomfleet-mongodb.service",
                                     render_template("dicomfleet-mongodb.service.j2", context),
                                     "dicomfleet-mongodb.service.j2", mongodb_restart))
        plan.services.append("dicomfleet-mongodb.service")

    plan.services.extend(["orthanc.service", "dicomfleet-sync.service"])

    from dicomfleet.dashboard import rollout

    rollout.add_dashboard(plan, site, server, secrets, context)

    from dicomfleet import archive

    archive.plan_central(plan, site, server, secrets)


def _plan_agent(plan: HostPlan, site: Site, machines: list[Machine],
                secrets: credentials.SiteSecrets) -> None:
    context = agent_context(site, plan.host, machines)
    plan.roles.append(ROLE_AGENT)
    plan.needs_venv = True
    plan.users.append(AGENT_USER)
    plan.directories.append(ManagedDirectory("/etc/dicomfleet", "0755", "root", "root"))
    plan.directories.append(ManagedDirectory(CREDENTIALS_DIR, "0700", "root", "root"))
    for folder in context["watch_folders"]:
        # The scanner writes here; the agent's group may read and move files.
        plan.directories.append(ManagedDirectory(folder, "2775", "root", AGENT_USER))
    for folder in context["archive_folders"]:
        plan.directories.append(ManagedDirectory(folder, "2770", "root", AGENT_USER))

    restart = ("dicomfleet-agent.service",)
    plan.files.append(_root_file("/etc/dicomfleet/agent.toml",
                                 render_template("agent.toml.j2", context),
                                 "agent.toml.j2", restart))
    for machine in machines:
        plan.files.append(_root_file(f"{CREDENTIALS_DIR}/orthanc-{machine.id}.password",
                                     secrets.orthanc_password(machine.orthanc_username) + "\n",
                                     "", restart, mode="0600", secret=True))
        plan.files.append(_root_file(f"{CREDENTIALS_DIR}/heartbeat-{machine.id}.token",
                                     secrets.heartbeat_token(machine.id) + "\n",
                                     "", restart, mode="0600", secret=True))
    plan.files.append(_root_file("/etc/systemd/system/dicomfleet-agent.service",
                                 render_template("dicomfleet-agent.service.j2", context),
                                 "dicomfleet-agent.service.j2", restart))
    plan.services.append("dicomfleet-agent.service")

    from dicomfleet import archive

    archive.plan_agent(plan, site, machines, secrets)


def _dedupe_directories(plan: HostPlan) -> None:
    seen: dict[str, ManagedDirectory] = {}
    for directory in plan.directories:
        seen.setdefault(directory.path, directory)
    plan.directories = list(seen.values())


def plan_host(site: Site, host: str, secrets: credentials.SiteSecrets) -> HostPlan:
    """Return what the deploy puts on the inventory host HOST."""
    entry = site.hosts[host]
    plan = HostPlan(host=host, address=str(entry.vars.get("ansible_host", host)), roles=[])

    if host in site.servers:
        _plan_central(plan, site, site.servers[host], secrets)

    # A file server's agent serves every share machine that names it in dicomfleet_share_host.
    agent_machines = [m for m in site.machines.values() if m.agent_host == host]
    if agent_machines:
        _plan_agent(plan, site, agent_machines, secrets)

    from dicomfleet import archive

    archive.plan_cluster_services(plan, site, host, secrets)

    _dedupe_directories(plan)
    return plan


def deployed_hosts(site: Site) -> list[str]:
    """Return the inventory hosts the deploy touches, central hosts first."""
    hosts = list(site.servers)
    for machine in site.machines.values():
        if machine.agent_host and machine.agent_host not in hosts:
            hosts.append(machine.agent_host)

    from dicomfleet import cluster

    for host in cluster.service_hosts(site):
        if host not in hosts:
            hosts.append(host)
    return hosts


def render_site(site: Site, outdir: Path, secrets: credentials.SiteSecrets) -> list[Path]:
    """Write every managed file of every deployed host under OUTDIR/HOST/; return the paths."""
    written = []
    for host in deployed_hosts(site):
        plan = plan_host(site, host, secrets)
        for managed in plan.files:
            target = outdir / host / managed.path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(managed.content, encoding="utf-8")
            os.chmod(target, int(managed.mode, 8))
            written.append(target)
    return written
