"""The dashboard's part of a central host's deploy plan: its user, configuration, secrets, unit and alert rules.

``render._plan_central`` calls ``add_dashboard``; the values come from the
inventory with the defaults documented in docs/inventory.md.
"""

from __future__ import annotations

import ipaddress

from dicomfleet import credentials
from dicomfleet.dashboard.heartbeats import token_digest
from dicomfleet.inventory import Machine, OrthancServer, Site, is_loopback

SERVICE_USER = "dicomfleet-dashboard"
UNIT = "dicomfleet-dashboard.service"
CONFIG_PATH = "/etc/dicomfleet/dashboard.toml"
ALERT_RULES_PATH = "/etc/dicomfleet/prometheus/dicomfleet-alerts.yml"
HEARTBEAT_API = "/api/v1/heartbeats"

DEFAULT_PORT = 8050
DEFAULT_HTTPS_PORT = 8443
DEFAULT_TRUSTED_PROXIES = ["127.0.0.1", "::1"]
# nginx serves the dashboard over HTTPS from this site file when the host has TLS.
NGINX_SITE = "/etc/nginx/sites-enabled/dicomfleet-dashboard.conf"


def behind_tls(server: OrthancServer) -> bool:
    """Return True when nginx serves SERVER's dashboard over HTTPS (the host's ``dicomfleet_tls``)."""
    return bool(server.vars.get("dicomfleet_tls", True))


def dashboard_port(server: OrthancServer) -> int:
    """Return the port the dashboard itself listens on: plain HTTP, on loopback when nginx fronts it."""
    return int(server.vars.get("dicomfleet_dashboard_port", DEFAULT_PORT))


def dashboard_https_port(server: OrthancServer) -> int:
    """Return the port nginx serves the dashboard on over HTTPS on SERVER's address."""
    return int(server.vars.get("dicomfleet_dashboard_https_port", DEFAULT_HTTPS_PORT))


def network_port(server: OrthancServer) -> int:
    """Return the dashboard's port as the network reaches it: nginx's HTTPS port, or the plain one without TLS."""
    return dashboard_https_port(server) if behind_tls(server) else dashboard_port(server)


def dashboard_url(server: OrthancServer) -> str:
    """Return the URL agents and ``dicomfleet status`` use to reach SERVER's dashboard, without a trailing slash."""
    from dicomfleet.proxy import url_host

    scheme = "https" if behind_tls(server) else "http"
    default = f"{scheme}://{url_host(server.address)}:{network_port(server)}"
    return str(server.vars.get("dicomfleet_dashboard_url", default)).rstrip("/")


def dashboard_login(server: OrthancServer) -> str:
    """Return the dashboard's login user name."""
    return str(server.vars.get("dicomfleet_dashboard_login", credentials.DEFAULT_DASHBOARD_LOGIN))


def listen_address(server: OrthancServer) -> str:
    """Return the address the dashboard's plain HTTP listener binds on SERVER's host.

    Behind nginx that is loopback: the host's own address when it is a loopback
    one (lab hosts share one loopback, 127.0.10.x each), else 127.0.0.1. Without
    TLS the dashboard serves the network itself, on the host's address.
    """
    configured = server.vars.get("dicomfleet_dashboard_bind")
    if configured:
        return str(configured)
    if behind_tls(server):
        return server.address if is_loopback(server.address) else "127.0.0.1"
    try:
        ipaddress.ip_address(server.address)
    except ValueError:
        # NOTE: a host name cannot be bound, so without TLS the dashboard listens on every IPv4 address.
        return "0.0.0.0"
    return server.address


def machine_settings(machine: Machine, secrets: credentials.SiteSecrets) -> dict:
    """Return MACHINE's entry in the dashboard's configuration."""
    data = machine.vars
    sends_heartbeats = machine.ingest != "dicom"
    digest = token_digest(secrets.heartbeat_token(machine.id)) if sends_heartbeats else ""
    return {
        "id": machine.id,
        "ae_title": machine.ae_title,
        "modality": machine.modality,
        "location": machine.location,
        "host": machine.host,
        "ingest": machine.ingest,
        "transport": machine.transport,
        "watch_folders": list(machine.watch_folders),
        "working_hours": str(data.get("dicomfleet_working_hours", "always")),
        "silent_after_s": float(data.get("dicomfleet_silent_after_minutes", 120)) * 60,
        "offline_after_s": float(data.get("dicomfleet_offline_after_s", 120)),
        "heartbeat_interval_s": float(data.get("dicomfleet_heartbeat_interval_s", 30)),
        "queue_warning_s": float(data.get("dicomfleet_queue_warning_minutes", 15)) * 60,
        "free_space_warning_bytes": int(float(data.get("dicomfleet_free_space_warning_mb", 2048)) * 1024 * 1024),
        "token_sha256": digest,
    }


def dashboard_context(site: Site, server: OrthancServer, secrets: credentials.SiteSecrets,
                      server_context: dict) -> dict:
    """Return the template variables of the dashboard's configuration and unit on SERVER's host.

    SERVER_CONTEXT is render.server_context's result, for the MongoDB and Orthanc values it shares.
    """
    data = server.vars
    return {
        **server_context,
        "dashboard": {
            "listen": listen_address(server),
            "port": dashboard_port(server),
            "url": dashboard_url(server),
            "timezone": str(data.get("dicomfleet_timezone", "")),
            "login": dashboard_login(server),
            "trusted_proxies": [str(item) for item in
                                data.get("dicomfleet_dashboard_trusted_proxies", DEFAULT_TRUSTED_PROXIES)],
            "sync_lag_alert_s": float(data.get("dicomfleet_sync_lag_alert_minutes", 10)) * 60,
            "disk_alert_percent": float(data.get("dicomfleet_orthanc_disk_alert_percent", 85)),
            "orthanc_user": credentials.DASHBOARD_USER,
        },
        "dashboard_machines": [machine_settings(machine, secrets) for machine in site.machines_of(server)],
    }


def add_dashboard(plan, site: Site, server: OrthancServer, secrets: credentials.SiteSecrets,
                  server_context: dict) -> None:
    """Add the dashboard's user, files and service to the central host's PLAN (a render.HostPlan)."""
    from dicomfleet import render

    context = dashboard_context(site, server, secrets, server_context)
    login = context["dashboard"]["login"]
    restart = (UNIT,)
    plan.users.append(SERVICE_USER)
    plan.directories.append(render.ManagedDirectory("/etc/dicomfleet/prometheus", "0755", "root", "root"))

    plan.files.append(render.ManagedFile(
        path=CONFIG_PATH, content=render.render_template("dashboard.toml.j2", context), mode="0640",
        owner="root", group=SERVICE_USER, template="dashboard.toml.j2", restarts=restart))
    secret_files = {
        "dashboard-login.password": secrets.dashboard_password(login),
        "dashboard-session.key": secrets.dashboard_session_key(),
        "orthanc-dashboard.password": secrets.orthanc_password(credentials.DASHBOARD_USER),
    }
    for name, value in secret_files.items():
        plan.files.append(render.ManagedFile(
            path=f"{render.CREDENTIALS_DIR}/{name}", content=value + "\n", mode="0600", owner="root",
            group="root", template="", restarts=restart, secret=True))
    plan.files.append(render.ManagedFile(
        path=f"/etc/systemd/system/{UNIT}", content=render.render_template("dicomfleet-dashboard.service.j2", context),
        mode="0644", owner="root", group="root", template="dicomfleet-dashboard.service.j2", restarts=restart))
    plan.files.append(render.ManagedFile(
        path=ALERT_RULES_PATH, content=render.render_template("dicomfleet-alerts.yml.j2", context),
        mode="0644", owner="root", group="root", template="dicomfleet-alerts.yml.j2"))
    plan.services.append(UNIT)
