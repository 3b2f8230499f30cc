"""Additions the deploy makes to the archive's hosts: Orthanc's plugins and sandbox, nginx, firewall, backups.

render.plan_host calls ``plan_central`` for each central host, ``plan_agent`` for
each host that runs the agent and ``plan_cluster_services`` for every host. Each
only adds to the host's plan, so pyinfra and the Ansible roles put the same files
in place.
"""

from __future__ import annotations

import json

from dicomfleet import archive_checks, backup_units, credentials, firewall, netplan, postgresql, proxy, render, tls
from dicomfleet import cluster as clusters
from dicomfleet.inventory import Machine, OrthancServer, Site

ORTHANC_UNIT = "orthanc.service"
ORTHANC_DROP_IN = "/etc/systemd/system/orthanc.service.d/dicomfleet-hardening.conf"
ORTHANC_LOG_DIR = "/var/log/orthanc"
ORTHANC_HOME = "/var/lib/orthanc"
WEBVIEWER_CACHE = f"{ORTHANC_HOME}/webviewer-cache"
NETWORK_PLAN = "/etc/dicomfleet/network-plan.md"

# The configuration file each plugin package ships, which the deploy replaces so no section is defined twice.
PLUGIN_PACKAGES = archive_checks.PLUGIN_PACKAGES


def requested_plugins(server: OrthancServer) -> list[str]:
    """Return the Debian plugin packages SERVER requests (``dicomfleet_orthanc_plugin_packages``)."""
    return [str(name) for name in server.vars.get("dicomfleet_orthanc_plugin_packages") or []]


def plugin_settings(site: Site, server: OrthancServer, package: str) -> dict:
    """Return the configuration section of the plugin PACKAGE on SERVER."""
    if package == "orthanc-dicomweb":
        settings = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"}
        if proxy.tls_enabled(site, server.host):
            # WADO-RS links point at the URL viewers use, behind nginx.
            public = proxy.public_url(site, server).removeprefix("https://")
            settings.update({"Ssl": True, "Host": public})
        return {"DicomWeb": settings}
    if package == "orthanc-webviewer":
        return {"WebViewer": {"CachePath": WEBVIEWER_CACHE, "CacheSize": 1000}}
    if package == "orthanc-gdcm":
        return {"Gdcm": {"Enable": True, "Throttling": 4}}
    raise ValueError(f"unknown Orthanc plugin package {package!r}; known: {', '.join(PLUGIN_PACKAGES)}")


def _json(settings: dict) -> str:
    return json.dumps(settings, indent=2) + "\n"


def _orthanc_file(path: str, content: str, template: str, group: str = "root", mode: str = "0644",
                  secret: bool = False) -> render.ManagedFile:
    return render.ManagedFile(path=path, content=content, mode=mode, owner="root", group=group,
                              template=template, restarts=(ORTHANC_UNIT,), secret=secret)


def _plan_orthanc(plan: render.HostPlan, site: Site, server: OrthancServer, settings: dict,
                  secrets: credentials.SiteSecrets) -> None:
    """Add Orthanc's folders, plugins and sandbox to PLAN."""
    storage = settings["storage_directory"]
    index = settings["index_directory"]
    plan.directories.append(render.ManagedDirectory(storage, "0750", "orthanc", "orthanc"))
    plan.directories.append(render.ManagedDirectory(index, "0750", "orthanc", "orthanc"))

    plugins = requested_plugins(server)
    for package in plugins:
        plan.apt_packages.append(package)
        plan.files.append(_orthanc_file(PLUGIN_PACKAGES[package],
                                        _json(plugin_settings(site, server, package)), ""))
    if "orthanc-webviewer" in plugins:
        plan.directories.append(render.ManagedDirectory(WEBVIEWER_CACHE, "0750", "orthanc", "orthanc"))

    if clusters.cluster_of(site, server.host) is not None:
        plan.apt_packages.append("orthanc-postgresql")
        plan.files.append(_orthanc_file(postgresql.PLUGIN_CONFIG,
                                        _json(postgresql.plugin_settings(site, server, secrets)), "",
                                        group="orthanc", mode="0640", secret=True))

    writable = [ORTHANC_HOME, ORTHANC_LOG_DIR]
    for folder in (storage, index):
        if folder not in writable and not folder.startswith(ORTHANC_HOME + "/"):
            writable.append(folder)
    context = {
        "host": server.host,
        "writable": writable,
        "privileged_ports": server.http_port < 1024 or server.dicom_port < 1024,
    }
    plan.files.append(_orthanc_file(ORTHANC_DROP_IN, render.render_template("orthanc-hardening.conf.j2", context),
                                    "orthanc-hardening.conf.j2"))


def _remove_sync(plan: render.HostPlan) -> None:
    """Take the sync and the embedded MongoDB off a secondary cluster node's PLAN.

    The primary node's sync reads the change feed the whole cluster shares.
    """
    units = {"dicomfleet-sync.service", "dicomfleet-mongodb.service"}
    plan.files = [f for f in plan.files if not units.intersection(f.restarts)]
    plan.services = [unit for unit in plan.services if unit not in units]
    plan.users = [user for user in plan.users if user not in (render.SYNC_USER, render.MONGODB_USER)]


def plan_firewall(plan: render.HostPlan, site: Site, host: str) -> None:
    """Add HOST's nftables rules and the unit that loads them to PLAN, when its firewall is on.

    On lab hosts the rules are written but not loaded (see firewall.applied).
    """
    if not firewall.enabled(site, host) or any(f.path == firewall.RULES_PATH for f in plan.files):
        return

    applied = firewall.applied(site, host)
    context = {
        "host": host,
        "site": site,
        "rules": firewall.rules_for(site, host),
        "rules_path": firewall.RULES_PATH,
        "table": firewall.TABLE,
    }
    restarts = (firewall.UNIT,) if applied else ()
    plan.apt_packages.append("nftables")
    plan.directories.append(render.ManagedDirectory("/etc/dicomfleet", "0755", "root", "root"))
    plan.files.append(render.ManagedFile(firewall.RULES_PATH, render.render_template("firewall.nft.j2", context),
                                         "0644", "root", "root", "firewall.nft.j2", restarts))
    plan.files.append(render.ManagedFile(f"/etc/systemd/system/{firewall.UNIT}",
                                         render.render_template("dicomfleet-firewall.service.j2", context),
                                         "0644", "root", "root", "dicomfleet-firewall.service.j2", restarts))
    plan.files.append(render.ManagedFile(firewall.DEBIAN_UNIT_DROP_IN,
                                         render.render_template("nftables-hardening.conf.j2", context),
                                         "0644", "root", "root", "nftables-hardening.conf.j2"))
    if applied:
        plan.services.append(firewall.UNIT)


def plan_central(plan: render.HostPlan, site: Site, server: OrthancServer,
                 secrets: credentials.SiteSecrets) -> None:
    """Add to the central host's PLAN its plugins, sandbox, nginx, firewall, backups and network plan."""
    settings = render.orthanc_settings(site, server)
    _plan_orthanc(plan, site, server, settings, secrets)

    if proxy.tls_enabled(site, server.host):
        proxy.plan_front(plan, site, server, secrets)

    plan_firewall(plan, site, server.host)
    backup_units.plan_backups(plan, site, server, settings, secrets)

    if clusters.is_secondary(site, server.host):
        _remove_sync(plan)

    plan.files.append(render.ManagedFile(NETWORK_PLAN, netplan.render_network_plan(site), "0644", "root", "root",
                                         "network-plan.md.j2"))


def plan_agent(plan: render.HostPlan, site: Site, machines: list[Machine],
               secrets: credentials.SiteSecrets) -> None:
    """Add the site CA's certificate to the PLAN of a host whose agent sends uploads or heartbeats over HTTPS."""
    urls = [proxy.machine_url(site, machine) for machine in machines]
    urls.append(render.heartbeat_url(site, machines) or "")
    if not any(url.startswith("https://") for url in urls):
        return
    plan.directories.append(render.ManagedDirectory(tls.TLS_DIR, "0755", "root", "root"))
    plan.files.append(render.ManagedFile(tls.CA_FILE, tls.ca_certificate(site, secrets), "0644", "root", "root",
                                         "", ("dicomfleet-agent.service",)))


def plan_cluster_services(plan: render.HostPlan, site: Site, host: str,
                          secrets: credentials.SiteSecrets) -> None:
    """Add to PLAN the cluster balancer and PostgreSQL server that HOST runs, with their firewall."""
    balanced = clusters.balancer_hosts(site).get(host, [])
    served = clusters.postgresql_hosts(site).get(host, [])
    if not balanced and not served:
        return

    if balanced:
        proxy.plan_balancer(plan, site, host, balanced, secrets)
    if served:
        postgresql.plan_server(plan, site, host, served, secrets)
    plan_firewall(plan, site, host)
