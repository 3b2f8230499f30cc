"""Print one site's fleet in the terminal: dicomfleet status INVENTORY [--json].

It reads each central host's dashboard through its JSON API, as the dashboard's
login user. It exits 0 when every machine is ok or in warning, and 1 when a
machine is silent or offline or an Orthanc server is down. It exits 2 for an
invalid inventory and 3 when a dashboard cannot be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
import zoneinfo
from typing import Any

import requests

from dicomfleet import credentials, tls
from dicomfleet.dashboard import rollout, timefmt
from dicomfleet.inventory import InventoryError, OrthancServer, Site, load_site

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_MACHINES_DOWN = 1
EXIT_INVENTORY = 2
EXIT_UNREACHABLE = 3

FLEET_API = "/api/v1/fleet"


@dataclasses.dataclass
class ServerStatus:
    """One central host's dashboard as read, or why it could not be read."""

    host: str
    url: str
    fleet: dict[str, Any] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the entry of ``--json``."""
        return {"host": self.host, "dashboard_url": self.url, "error": self.error, "fleet": self.fleet}


def read_dashboard(site: Site, server: OrthancServer, secrets: credentials.SiteSecrets,
                   timeout: float) -> ServerStatus:
    """Read SERVER's fleet from its dashboard's JSON API."""
    url = rollout.dashboard_url(server)
    result = ServerStatus(host=server.host, url=url)
    login = rollout.dashboard_login(server)
    password = secrets.dashboard_password(login)
    if password == credentials.PLACEHOLDER:
        result.error = (f"no password for the dashboard user {login} in {secrets.folder}; deploy the site "
                        "first, or set DICOMFLEET_SECRETS_DIR to the folder holding its secrets")
        return result

    verify: bool | str = True
    if url.startswith("https://"):
        ca_file = tls.ca_certificate_file(site, secrets)
        if not ca_file.is_file():
            result.error = (f"no CA certificate at {ca_file} to verify the dashboard at {url}; deploy the site "
                            "first, or set DICOMFLEET_SECRETS_DIR to the folder holding its secrets")
            return result
        verify = str(ca_file)
    try:
        answer = requests.get(url + FLEET_API, auth=(login, password), timeout=timeout, verify=verify)
    except requests.RequestException as error:
        result.error = f"the dashboard at {url} does not answer: {error}"
        return result
    if answer.status_code != 200:
        result.error = (f"the dashboard at {url} answered HTTP {answer.status_code}: "
                        f"{answer.text.strip()[:200]}")
        return result
    try:
        result.fleet = answer.json()
    except ValueError:
        result.error = f"the dashboard at {url} did not send JSON; is this URL the dashboard?"
    return result


def _parse_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value)


def _age(value: str | None, now: datetime.datetime) -> str:
    moment = _parse_time(value)
    if moment is None:
        return "never"
    return timefmt.duration((now - moment).total_seconds()) + " ago"


def _number(value: Any) -> str:
    return "-" if value is None else str(value)


def format_server(status: ServerStatus, zone: datetime.tzinfo | None) -> str:
    """Return SERVER's table of machines and its Orthanc line."""
    lines = []
    if status.fleet is None:
        return f"Dashboard {status.url} ({status.host}): {status.error}."

    fleet = status.fleet
    now = _parse_time(fleet["generated_at"])
    header = ("MACHINE", "STATE", "LAST HEARTBEAT", "LAST STUDY", "STUDIES TODAY", "INSTANCES TODAY", "QUEUE", "FAILED",
              "QUARANTINED", "WHY")
    rows = [header]
    for machine in fleet["machines"]:
        heartbeat = _age(machine["last_heartbeat_at"], now)
        if machine["ingest"] == "dicom":
            heartbeat = "no agent"
        rows.append((
            machine["id"], machine["state"], heartbeat,
            timefmt.moment(_parse_time(machine["last_study_at"]), zone, now),
            _number(machine["studies_today"]), _number(machine["instances_today"]),
            _number(machine["files_queued"]), _number(machine["files_failed"]),
            _number(machine["files_quarantined_today"]), "; ".join(machine["reasons"]),
        ))
    widths = [max(len(str(row[index])) for row in rows) for index in range(len(header) - 1)]
    for row in rows:
        cells = [str(value).ljust(width) for value, width in zip(row, widths)]
        lines.append("  ".join(cells + [str(row[-1])]).rstrip())

    orthanc = fleet["orthanc"]
    if orthanc["online"]:
        disk = "-"
        if orthanc["disk_used_percent"] is not None:
            disk = f"{orthanc['disk_used_percent']:.0f} % used, {timefmt.size(orthanc['disk_free_bytes'])} free"
        lag = orthanc["sync_lag_changes"]
        if lag is None:
            sync = "sync position unknown"
        elif lag == 0:
            sync = "sync up to date"
        else:
            sync = f"sync {lag} changes behind for {timefmt.duration(orthanc['sync_behind_s'])}"
        lines.append(f"Orthanc {orthanc['name']}: online, version {orthanc['version']}, {orthanc['studies']} "
                     f"studies, {orthanc['instances']} instances, disk {disk}, {sync}.")
    else:
        lines.append(f"Orthanc {orthanc['name'] or status.host}: OFFLINE: {orthanc['error']}")

    counts = ", ".join(f"{fleet['states'][name]} {name}" for name in ("ok", "warning", "silent", "offline"))
    lines.append(f"{len(fleet['machines'])} machines: {counts} (dashboard {status.url}, as of "
                 f"{timefmt.moment(now, zone, now)}).")
    if fleet.get("error"):
        lines.append(f"Warning: {fleet['error']}")
    return "\n".join(lines)


def exit_status(statuses: list[ServerStatus]) -> int:
    """Return the command's exit status for STATUSES."""
    if any(status.fleet is None for status in statuses):
        return EXIT_UNREACHABLE
    for status in statuses:
        fleet = status.fleet
        if fleet["states"]["silent"] or fleet["states"]["offline"] or not fleet["orthanc"]["online"]:
            return EXIT_MACHINES_DOWN
    return EXIT_OK


def _site_zone(site: Site) -> datetime.tzinfo | None:
    for server in site.servers.values():
        name = server.vars.get("dicomfleet_timezone")
        if name:
            return zoneinfo.ZoneInfo(str(name))
    return None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet status", description=__doc__.splitlines()[0],
                                     epilog="Exit status: 0 all machines ok or in warning; 1 a machine is silent "
                                            "or offline, or Orthanc is down; 2 invalid inventory; 3 a dashboard "
                                            "cannot be read.")
    parser.add_argument("inventory", help="the site's inventory YAML file")
    parser.add_argument("--json", action="store_true", help="print the dashboards' JSON instead of tables")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for each dashboard (default 10)")
    return parser


def main(args: list[str] | None = None) -> int:
    """Print the site's status and return the exit status."""
    options = _build_parser().parse_args(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        site = load_site(options.inventory)
    except InventoryError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return EXIT_INVENTORY

    secrets = credentials.existing_secrets(site)
    statuses = [read_dashboard(site, server, secrets, options.timeout) for server in site.servers.values()]
    status = exit_status(statuses)

    if options.json:
        document = {"site": site.name, "exit_status": status, "servers": [entry.to_json() for entry in statuses]}
        print(json.dumps(document, indent=2))
        return status

    zone = _site_zone(site)
    print(f"Site {site.name}")
    for entry in statuses:
        print()
        print(format_server(entry, zone))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
