"""The PostgreSQL server with the shared index of Orthanc clusters, and the nodes' login to it.

Each cluster gets its own role and database on the host named by
``dicomfleet_postgresql_host``. The role's password is generated with the site's
secrets; the PostgreSQL host only ever receives its SCRAM-SHA-256 verifier, and the
nodes receive the password in Orthanc's plugin configuration, readable by Orthanc alone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from dicomfleet import cluster as clusters
from dicomfleet import credentials, render
from dicomfleet.inventory import OrthancServer, Site

UNIT = "postgresql.service"
CONFIG_DIR = f"/etc/postgresql/{clusters.POSTGRESQL_VERSION}/main"
SETUP_SQL = "/etc/dicomfleet/postgresql-setup.sql"
HARDENING_DROP_IN = "/etc/systemd/system/postgresql@.service.d/dicomfleet-hardening.conf"
UMBRELLA_DROP_IN = "/etc/systemd/system/postgresql.service.d/dicomfleet-hardening.conf"
PLUGIN_CONFIG = "/etc/orthanc/postgresql.json"
PGPASS = f"{render.CREDENTIALS_DIR}/postgresql.pgpass"

SCRAM_ITERATIONS = 4096
DEFAULT_INDEX_CONNECTIONS = 5
# Connections kept free for administration, backups and the setup script.
RESERVED_CONNECTIONS = 20


def role_name(cluster: clusters.Cluster) -> str:
    """Return the PostgreSQL role of CLUSTER's nodes: ``orthanc_`` and the cluster name."""
    return f"{clusters.POSTGRESQL_USER}_{re.sub(r'[^a-z0-9_]', '_', cluster.name)}"


def database_name(cluster: clusters.Cluster) -> str:
    """Return CLUSTER's database, ``dicomfleet_postgresql_database`` or the role's name."""
    return cluster.database or role_name(cluster)


def password(cluster: clusters.Cluster, secrets: credentials.SiteSecrets) -> str:
    """Return the password of CLUSTER's role, generated on the first deploy."""
    # TODO: use a public SiteSecrets method for secrets that are not Orthanc passwords.
    return secrets.secret(cluster.password_secret)


def scram_verifier(secret: str, salt: bytes | None = None) -> str:
    """Return the SCRAM-SHA-256 verifier of SECRET in PostgreSQL's format (RFC 5802 and RFC 7677).

    Without SALT, the salt is derived from the secret itself, so the verifier,
    and the file that carries it, stays the same from one deploy to the next.
    """
    data = secret.encode("utf-8")
    if salt is None:
        salt = hmac.new(data, b"dicomfleet postgresql salt", hashlib.sha256).digest()[:16]
    salted = hashlib.pbkdf2_hmac("sha256", data, salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def encode(value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{encode(salt)}${encode(stored_key)}:{encode(server_key)}"


def index_connections(server: OrthancServer) -> int:
    """Return the number of connections each Orthanc node keeps to the index."""
    return int(server.vars.get("dicomfleet_postgresql_index_connections", DEFAULT_INDEX_CONNECTIONS))


def plugin_settings(site: Site, server: OrthancServer, secrets: credentials.SiteSecrets) -> dict:
    """Return the PostgreSQL plugin's section of a cluster node's Orthanc configuration."""
    cluster = clusters.cluster_of(site, server.host)
    return {
        "PostgreSQL": {
            "EnableIndex": True,
            "EnableStorage": False,
            "Host": cluster.postgresql_address,
            "Port": cluster.postgresql_port,
            "Database": database_name(cluster),
            "Username": role_name(cluster),
            "Password": password(cluster, secrets),
            # Several Orthanc servers write to the same database.
            "Lock": False,
            "EnableSsl": True,
            "MaximumConnectionRetries": 30,
            "ConnectionRetryInterval": 5,
            "IndexConnectionsCount": index_connections(server),
        }
    }


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def pgpass_line(cluster: clusters.Cluster, secrets: credentials.SiteSecrets) -> str:
    """Return the pgpass line that lets the primary node's backups log in to CLUSTER's database."""
    fields = [cluster.postgresql_address, str(cluster.postgresql_port), database_name(cluster),
              role_name(cluster), password(cluster, secrets)]
    return ":".join(_pgpass_field(field) for field in fields) + "\n"


def plan_server(plan: render.HostPlan, site: Site, host: str, served: list[clusters.Cluster],
                secrets: credentials.SiteSecrets) -> None:
    """Add to PLAN the PostgreSQL server of the clusters SERVED: package, settings, access rules and roles."""
    data = site.hosts[host].vars
    address = str(data.get("ansible_host", host))
    port = served[0].postgresql_port
    plan.roles.append("postgresql")
    plan.apt_packages.append("postgresql")
    plan.directories.append(render.ManagedDirectory("/etc/dicomfleet", "0755", "root", "root"))

    databases = []
    connections = 0
    for cluster in served:
        nodes = [site.servers[node] for node in cluster.nodes]
        connections += sum(index_connections(node) for node in nodes)
        databases.append({
            "name": database_name(cluster),
            "role": role_name(cluster),
            "verifier": scram_verifier(password(cluster, secrets)),
            "clients": [node.address for node in nodes],
            "cluster": cluster.name,
        })

    context = {
        "host": host,
        "site": site,
        "address": address,
        "port": port,
        "max_connections": max(100, connections + RESERVED_CONNECTIONS),
        "databases": databases,
        # Lab hosts share one loopback network, so every node connects from 127.0.0.1.
        "lab": bool(data.get("dicomfleet_lab", False)),
    }
    restart = (UNIT,)
    plan.files.append(render.ManagedFile(
        f"{CONFIG_DIR}/conf.d/dicomfleet.conf", render.render_template("postgresql.conf.j2", context),
        "0644", "root", "root", "postgresql.conf.j2", restart))
    plan.files.append(render.ManagedFile(
        f"{CONFIG_DIR}/pg_hba.conf", render.render_template("pg_hba.conf.j2", context),
        "0640", "postgres", "postgres", "pg_hba.conf.j2", restart))
    plan.files.append(render.ManagedFile(
        HARDENING_DROP_IN, render.render_template("postgresql-hardening.conf.j2", context),
        "0644", "root", "root", "postgresql-hardening.conf.j2", restart))
    plan.files.append(render.ManagedFile(
        UMBRELLA_DROP_IN, render.render_template("postgresql-umbrella-hardening.conf.j2", context),
        "0644", "root", "root", "postgresql-umbrella-hardening.conf.j2", restart))
    plan.files.append(render.ManagedFile(
        SETUP_SQL, render.render_template("postgresql-setup.sql.j2", context),
        "0600", "root", "root", "postgresql-setup.sql.j2", (), secret=True))
    plan.services.append(UNIT)

    # The file is read by root's shell and given to psql on its standard input.
    plan.commands.append(render.ManagedCommand(
        name="Create or update the Orthanc roles and databases in PostgreSQL.",
        command=(f"cd / && for attempt in $(seq 60); do runuser -u postgres -- pg_isready --quiet --port {port} && break; "
                 f"sleep 1; done; runuser -u postgres -- psql --no-psqlrc --quiet --set ON_ERROR_STOP=1 "
                 f"--port {port} --dbname postgres < {SETUP_SQL}"),
        after_changes=(SETUP_SQL, f"{CONFIG_DIR}/pg_hba.conf", f"{CONFIG_DIR}/conf.d/dicomfleet.conf"),
    ))
