"""The backup timers, services and configuration the deploy puts on a central host.

A daily timer backs up Orthanc's index and a weekly one snapshots its storage
folder into ``dicomfleet_backup_target`` (``dicomfleet backup``). A cluster is
backed up from its primary node only: the index with ``pg_dump``, the shared
storage folder like a standalone server's.
"""

from __future__ import annotations

from dicomfleet import cluster as clusters
from dicomfleet import credentials, postgresql, render
from dicomfleet.inventory import OrthancServer, Site

CONFIG = "/etc/dicomfleet/backup.toml"
INDEX_UNIT = "dicomfleet-backup-index"
STORAGE_UNIT = "dicomfleet-backup-storage"

DEFAULT_TARGET = "/var/backups/dicomfleet"
DEFAULT_INDEX_SCHEDULE = "*-*-* 02:30:00"
DEFAULT_STORAGE_SCHEDULE = "Sun *-*-* 03:30:00"
DEFAULT_INDEX_KEEP = 14
DEFAULT_STORAGE_KEEP = 4


def enabled(server: OrthancServer) -> bool:
    """Return True when SERVER backs itself up (``dicomfleet_backup``, default true)."""
    return bool(server.vars.get("dicomfleet_backup", True))


def backup_context(site: Site, server: OrthancServer, settings: dict) -> dict:
    """Return the template variables of SERVER's backup configuration, units and timers."""
    data = server.vars
    cluster = clusters.cluster_of(site, server.host)
    index = None
    if cluster is not None:
        index = {
            "host": cluster.postgresql_address,
            "port": cluster.postgresql_port,
            "database": postgresql.database_name(cluster),
            "username": postgresql.role_name(cluster),
            "credential": "pgpass",
            "pgpass_file": postgresql.PGPASS,
        }

    return {
        "host": server.host,
        "site": site,
        "server": server,
        "config_path": CONFIG,
        "storage_directory": settings["storage_directory"],
        "index_directory": settings["index_directory"],
        "target": str(data.get("dicomfleet_backup_target", DEFAULT_TARGET)),
        "index_kind": "postgresql" if cluster is not None else "sqlite",
        "postgresql": index,
        "index_keep": int(data.get("dicomfleet_backup_index_keep", DEFAULT_INDEX_KEEP)),
        "storage_keep": int(data.get("dicomfleet_backup_storage_keep", DEFAULT_STORAGE_KEEP)),
        "index_schedule": str(data.get("dicomfleet_backup_index_schedule", DEFAULT_INDEX_SCHEDULE)),
        "storage_schedule": str(data.get("dicomfleet_backup_storage_schedule", DEFAULT_STORAGE_SCHEDULE)),
        "pgpass_path": postgresql.PGPASS,
    }


def _file(path: str, content: str, template: str, restarts: tuple[str, ...] = (), mode: str = "0644",
          secret: bool = False) -> render.ManagedFile:
    return render.ManagedFile(path=path, content=content, mode=mode, owner="root", group="root",
                              template=template, restarts=restarts, secret=secret)


def plan_backups(plan: render.HostPlan, site: Site, server: OrthancServer, settings: dict,
                 secrets: credentials.SiteSecrets) -> None:
    """Add SERVER's backup configuration, services and timers to PLAN, unless backups are off."""
    if not enabled(server) or clusters.is_secondary(site, server.host):
        return

    context = backup_context(site, server, settings)
    plan.directories.append(render.ManagedDirectory(context["target"], "0750", "orthanc", "orthanc"))
    plan.files.append(_file(CONFIG, render.render_template("backup.toml.j2", context), "backup.toml.j2"))

    cluster = clusters.cluster_of(site, server.host)
    if cluster is not None:
        plan.apt_packages.append("postgresql-client")
        plan.files.append(_file(postgresql.PGPASS, postgresql.pgpass_line(cluster, secrets), "",
                                mode="0600", secret=True))

    for unit, template in ((INDEX_UNIT, "dicomfleet-backup-index.service.j2"),
                           (STORAGE_UNIT, "dicomfleet-backup-storage.service.j2")):
        timer_context = dict(context, unit=unit,
                             schedule=context["index_schedule" if unit == INDEX_UNIT else "storage_schedule"])
        plan.files.append(_file(f"/etc/systemd/system/{unit}.service",
                                render.render_template(template, context), template))
        plan.files.append(_file(f"/etc/systemd/system/{unit}.timer",
                                render.render_template("dicomfleet-backup.timer.j2", timer_context),
                                "dicomfleet-backup.timer.j2", restarts=(f"{unit}.timer",)))
        plan.services.append(f"{unit}.timer")
