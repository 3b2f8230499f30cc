"""Check an inventory against dicomfleet's rules before any host is contacted.

pyinfra's deploy, the Ansible playbook and every dicomfleet command call
``validate``; each problem is one sentence naming the inventory file, the host,
the variable, the value found and what a valid value is.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import zoneinfo
from typing import Any, Callable

from dicomfleet import archive_checks
from dicomfleet.dashboard import workinghours
# Defined in their own module so the agent reads its configuration without this module's imports.
from dicomfleet.dicomterms import MODALITIES, ae_title_problem  # noqa: F401
from dicomfleet.inventory import (
    CENTRAL_GROUP,
    FILESERVER_GROUP,
    INGEST_AGENT,
    INGEST_DICOM,
    INGEST_SHARE,
    TRANSPORT_CSTORE,
    TRANSPORT_REST,
    RawInventory,
)

INGEST_PATHS = (INGEST_AGENT, INGEST_SHARE, INGEST_DICOM)
TRANSPORTS = (TRANSPORT_REST, TRANSPORT_CSTORE)
PATIENT_ID_POLICIES = ("dicom", "placeholder")
AFTER_SEND_POLICIES = ("keep", "archive", "delete")

_MACHINE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def address_problem(value: Any) -> str | None:
    """Return why VALUE is not an IP literal or a host name, or None."""
    text = str(value)
    try:
        ipaddress.ip_address(text)
        return None
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", text):
        return "looks like an IPv4 address but is not a valid one"
    if _HOST_NAME.match(text):
        return None
    return "is neither an IP address nor a valid host name"


def _port_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"is a {type(value).__name__}, not a whole number"
    if not 1 <= value <= 65535:
        return "is outside the TCP port range 1 to 65535"
    return None


def _port_or_off_problem(value: Any) -> str | None:
    if type(value) is int and value == 0:
        return None
    problem = _port_problem(value)
    if problem:
        return f"{problem} (0 turns it off)"
    return None


def _string_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    return None


def _bool_problem(value: Any) -> str | None:
    if not isinstance(value, bool):
        return "must be true or false"
    return None


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value not in choices:
            return "is not one of " + ", ".join(choices)
        return None

    return check


def _machine_id_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not _MACHINE_ID.match(value):
        return ("must be 1 to 32 characters of lowercase letters, digits, '-' or '_', "
                "starting with a letter or digit (it names users, units and files)")
    return None


def _site_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not _SITE_NAME.match(value):
        return "must be 1 to 64 characters of lowercase letters, digits, '-' or '_'"
    return None


def _modality_problem(value: Any) -> str | None:
    if value not in MODALITIES:
        return "is not a DICOM modality defined term (for example CT, MR, CR, DX, US, MG, XA)"
    return None


def _folders_problem(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of absolute folder paths"
    for folder in value:
        if not isinstance(folder, str) or not folder.startswith("/"):
            return f"contains {folder!r}, which is not an absolute path"
        if "\n" in folder or "\x00" in folder:
            return f"contains {folder!r}, which has a control character"
    return None


def _mongodb_uri_problem(value: Any) -> str | None:
    if value in ("", None):
        return None
    if not isinstance(value, str) or not re.match(r"^mongodb(\+srv)?://", value):
        return "must be empty (embedded server) or a URI starting with mongodb:// or mongodb+srv://"
    return None


def _url_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not re.match(r"^https?://[^\s/]+", value):
        return "must be an http:// or https:// URL"
    return None


def _absolute_path_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith("/"):
        return "must be an absolute path"
    return None


def _plugins_problem(value: Any) -> str | None:
    if value == []:
        return None
    return _folders_problem(value)


def _count_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return "must be a whole number, 0 or more"
    return None


def _positive_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return "must be a number above 0"
    return None


def _timezone_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be an IANA time zone name such as Europe/Paris"
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return "is not an IANA time zone name known here (for example Europe/Paris or America/New_York)"
    return None


def _address_list_problem(value: Any) -> str | None:
    if not isinstance(value, list):
        return "must be a list of IP addresses"
    for item in value:
        try:
            ipaddress.ip_address(str(item))
        except ValueError:
            return f"contains {item!r}, which is not an IP address"
    return None


# Every dicomfleet_ variable the inventory may set: name -> (check, what it is).
SCHEMA: dict[str, tuple[Callable[[Any], str | None], str]] = {
    "dicomfleet_site": (_site_problem, "the site's short name"),
    "dicomfleet_lab": (_bool_problem, "true for the local systemd-nspawn lab"),
    "dicomfleet_patient_id_policy": (_choice(PATIENT_ID_POLICIES), "how the sync stores patient IDs"),
    "dicomfleet_patient_id_placeholder": (_string_problem, "the patient ID stored under the placeholder policy"),
    "dicomfleet_machine_id": (_machine_id_problem, "the machine's unique id"),
    "dicomfleet_ae_title": (ae_title_problem, "the machine's DICOM AE title"),
    "dicomfleet_modality": (_modality_problem, "the machine's modality"),
    "dicomfleet_location": (_string_problem, "where the machine stands"),
    "dicomfleet_ingest": (_choice(INGEST_PATHS), "how the machine's images reach Orthanc"),
    "dicomfleet_transport": (_choice(TRANSPORTS), "how the agent sends: REST or C-STORE"),
    "dicomfleet_watch_folders": (_folders_problem, "the export folders the agent watches"),
    "dicomfleet_orthanc": (_string_problem, "the central host the machine sends to"),
    "dicomfleet_share_host": (_string_problem, "the file server host whose agent watches a share machine's subfolder"),
    "dicomfleet_after_send": (_choice(AFTER_SEND_POLICIES), "what the agent does with a file once Orthanc's copy is verified"),
    "dicomfleet_archive_folder": (_absolute_path_problem, "the folder sent files are moved to under after_send archive"),
    "dicomfleet_orthanc_name": (_string_problem, "the Orthanc server's name"),
    "dicomfleet_orthanc_aet": (ae_title_problem, "Orthanc's own AE title"),
    "dicomfleet_orthanc_http_port": (_port_problem, "Orthanc's HTTP port"),
    "dicomfleet_orthanc_dicom_port": (_port_problem, "Orthanc's DICOM port"),
    "dicomfleet_orthanc_public_url": (_url_problem, "the URL viewers use to reach Orthanc"),
    "dicomfleet_mongodb_uri": (_mongodb_uri_problem, "the MongoDB the sync writes to"),
    "dicomfleet_mongodb_port": (_port_problem, "the embedded MongoDB-compatible server's port"),
    "dicomfleet_mongodb_database": (_string_problem, "the MongoDB database name"),
    "dicomfleet_mongodb_bind": (address_problem, "the address the embedded MongoDB-compatible server listens on"),
    "dicomfleet_dicom_port": (_port_problem, "the machine's own DICOM port, for Orthanc's modality entry"),
    "dicomfleet_orthanc_storage_directory": (_absolute_path_problem, "where Orthanc stores DICOM files"),
    "dicomfleet_orthanc_index_directory": (_absolute_path_problem, "where Orthanc keeps its SQLite index"),
    "dicomfleet_orthanc_storage_compression": (_bool_problem, "whether Orthanc compresses stored files"),
    "dicomfleet_orthanc_maximum_storage_mb": (_count_problem, "Orthanc's storage cap in MB, 0 for none"),
    "dicomfleet_orthanc_maximum_patient_count": (_count_problem, "Orthanc's patient cap, 0 for none"),
    "dicomfleet_orthanc_plugins": (_plugins_problem, "folders or files of Orthanc plugins"),
    "dicomfleet_orthanc_concurrent_jobs": (_positive_problem, "Orthanc's concurrent jobs"),
    "dicomfleet_orthanc_http_threads": (_positive_problem, "Orthanc's HTTP threads"),
    "dicomfleet_orthanc_dicom_threads": (_positive_problem, "Orthanc's DICOM threads"),
    "dicomfleet_orthanc_stable_age": (_positive_problem, "seconds without a new instance before a study is stable"),
    "dicomfleet_orthanc_remote_access": (_bool_problem, "whether Orthanc answers clients other than localhost"),
    "dicomfleet_agent_rescan_interval_s": (_positive_problem, "seconds between full rescans of the watch folders"),
    "dicomfleet_agent_quiet_time_s": (_positive_problem, "seconds a polled file must stay unchanged before it is sent"),
    "dicomfleet_agent_workers": (_positive_problem, "concurrent uploads per agent"),
    "dicomfleet_agent_metrics_port": (_port_or_off_problem, "the agent's Prometheus metrics port on 127.0.0.1, 0 for off"),
    "dicomfleet_records_on_delete": (_choice(("mark", "remove")), "what the sync does with the record of a deleted study"),
    "dicomfleet_sync_reconcile_interval_s": (_count_problem, "seconds between the sync's full reconciles, 0 for only at start"),
    "dicomfleet_sync_metrics_port": (_port_or_off_problem, "the sync's Prometheus metrics port on 127.0.0.1, 0 for off"),
    "dicomfleet_timezone": (_timezone_problem, "the site's time zone for working hours and 'today' (default: the central host's)"),
    "dicomfleet_working_hours": (workinghours.problem, "when the machine is expected to send images, e.g. 'Mon-Fri 07:00-19:00' or 'always'"),
    "dicomfleet_silent_after_minutes": (_positive_problem, "working minutes without a study before the machine counts as silent"),
    "dicomfleet_heartbeat_interval_s": (_positive_problem, "seconds between two heartbeats of an agent"),
    "dicomfleet_offline_after_s": (_positive_problem, "seconds without a heartbeat before an agent machine counts as offline"),
    "dicomfleet_queue_warning_minutes": (_positive_problem, "age in minutes of the oldest queued file that raises a warning"),
    "dicomfleet_free_space_warning_mb": (_positive_problem, "free space in MB of a watch folder below which a warning is raised"),
    "dicomfleet_dashboard_port": (_port_problem, "the port of the dashboard's own HTTP listener on the central host"),
    "dicomfleet_dashboard_https_port": (_port_problem, "the port nginx serves the dashboard on over HTTPS"),
    "dicomfleet_dashboard_bind": (address_problem, "the address the dashboard's own HTTP listener binds"),
    "dicomfleet_dashboard_url": (_url_problem, "the dashboard's URL as agents and 'dicomfleet status' reach it"),
    "dicomfleet_dashboard_login": (_machine_id_problem, "the dashboard's login user name"),
    "dicomfleet_dashboard_trusted_proxies": (_address_list_problem, "reverse proxies whose X-Forwarded- headers the dashboard honours"),
    "dicomfleet_orthanc_disk_alert_percent": (_positive_problem, "percent of Orthanc's storage disk in use that raises an alert"),
    "dicomfleet_sync_lag_alert_minutes": (_positive_problem, "minutes the sync may stay behind Orthanc's change feed before an alert"),
    "dicomfleet_tls": (_bool_problem, "whether nginx serves Orthanc's REST API over HTTPS on this host"),
    "dicomfleet_https_port": (_port_problem, "the port nginx serves HTTPS on"),
    "dicomfleet_tls_certificate": (_string_problem, "the host's PEM certificate chain, instead of one from the site CA"),
    "dicomfleet_tls_key": (_string_problem, "the PEM private key of dicomfleet_tls_certificate"),
    "dicomfleet_tls_ca_certificate": (_string_problem, "the PEM CA certificate that clients trust for dicomfleet_tls_certificate"),
    "dicomfleet_tls_names": (archive_checks.dns_names_problem, "extra DNS names in the certificate from the site CA"),
    "dicomfleet_firewall": (_bool_problem, "whether the deploy puts nftables rules on this host"),
    "dicomfleet_viewer_networks": (archive_checks.networks_problem, "networks whose browsers may reach HTTPS"),
    "dicomfleet_admin_networks": (archive_checks.networks_problem, "networks that may reach SSH"),
    "dicomfleet_imaging_vlan": (archive_checks.vlan_problem, "the VLAN id of the imaging network"),
    "dicomfleet_imaging_subnet": (archive_checks.network_problem, "the IP subnet of the imaging network"),
    "dicomfleet_orthanc_plugin_packages": (archive_checks.plugin_packages_problem, "Debian packages of Orthanc plugins to install and configure"),
    "dicomfleet_cluster": (archive_checks.name_problem, "the cluster this Orthanc server is a node of"),
    "dicomfleet_cluster_balancer": (_string_problem, "the inventory host running the cluster's nginx load balancer"),
    "dicomfleet_cluster_https_port": (_port_problem, "the port the cluster's load balancer serves HTTPS on"),
    "dicomfleet_postgresql_host": (_string_problem, "the inventory host running the cluster's PostgreSQL index"),
    "dicomfleet_postgresql_port": (_port_problem, "the PostgreSQL server's port"),
    "dicomfleet_postgresql_database": (archive_checks.name_problem, "the cluster's PostgreSQL database"),
    "dicomfleet_postgresql_index_connections": (_positive_problem, "connections each node keeps to the index"),
    "dicomfleet_backup": (_bool_problem, "whether the central host backs up Orthanc's index and storage"),
    "dicomfleet_backup_target": (_absolute_path_problem, "the folder backups are written to"),
    "dicomfleet_backup_index_schedule": (archive_checks.calendar_problem, "when the index backup runs (systemd OnCalendar)"),
    "dicomfleet_backup_storage_schedule": (archive_checks.calendar_problem, "when the storage snapshot runs (systemd OnCalendar)"),
    "dicomfleet_backup_index_keep": (_positive_problem, "index backups kept"),
    "dicomfleet_backup_storage_keep": (_positive_problem, "storage snapshots kept"),
}

MACHINE_REQUIRED = (
    "dicomfleet_ae_title",
    "dicomfleet_modality",
    "dicomfleet_location",
    "dicomfleet_ingest",
)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text


def validate(raw: RawInventory) -> list[str]:
    """Return every problem of the inventory RAW, or an empty list when it is valid."""
    problems: list[str] = []
    where = str(raw.path)

    def report(host: str, field: str, message: str) -> None:
        problems.append(f"{where}: host {host}: {field}: {message}.")

    if not raw.hosts:
        problems.append(f"{where}: the inventory has no hosts; add a central host and the machines.")
        return problems

    for entry in raw.hosts.values():
        for key, value in entry.vars.items():
            if not key.startswith("dicomfleet_"):
                continue
            if key not in SCHEMA:
                close = difflib.get_close_matches(key, SCHEMA, n=1)
                hint = f"; did you mean {close[0]}?" if close else "; see the variables in docs/inventory.md"
                report(entry.name, key, f"unknown variable{hint}")
                continue
            check, what = SCHEMA[key]
            problem = check(value)
            if problem:
                report(entry.name, key, f"{_describe(value)} {problem} ({what})")

        address = entry.vars.get("ansible_host", entry.name)
        problem = address_problem(address)
        if problem:
            report(entry.name, "ansible_host", f"{_describe(address)} {problem}")

    central = [e for e in raw.hosts.values() if CENTRAL_GROUP in e.groups]
    if not central:
        problems.append(
            f"{where}: no host in the group '{CENTRAL_GROUP}'; add the Orthanc server there."
        )
    central_names = {e.name for e in central}

    seen_ids: dict[str, str] = {}
    seen_aets: dict[str, str] = {}
    seen_pairs: dict[tuple[str, str], str] = {}
    for entry in raw.hosts.values():
        data = entry.vars
        if "dicomfleet_machine_id" not in data:
            continue
        host = entry.name
        machine_id = data["dicomfleet_machine_id"]

        for field in MACHINE_REQUIRED:
            if field not in data:
                report(host, field, f"missing; every machine needs it ({SCHEMA[field][1]})")

        if isinstance(machine_id, str):
            if machine_id in seen_ids:
                report(host, "dicomfleet_machine_id",
                       f"{machine_id!r} is already used by host {seen_ids[machine_id]}; machine ids are unique")
            seen_ids.setdefault(machine_id, host)

        ae_title = data.get("dicomfleet_ae_title")
        if isinstance(ae_title, str) and ae_problem_free(ae_title):
            # Orthanc compares AE titles without regard to case by default.
            key = ae_title.strip().upper()
            if key in seen_aets:
                report(host, "dicomfleet_ae_title",
                       f"{ae_title!r} is already used by host {seen_aets[key]}; AE titles are unique across the fleet")
            seen_aets.setdefault(key, host)
            pair = (key, str(data.get("ansible_host", host)))
            if pair in seen_pairs and seen_pairs[pair] != host:
                report(host, "dicomfleet_ae_title",
                       f"the AE title and address pair {pair} is already used by host {seen_pairs[pair]}")
            seen_pairs.setdefault(pair, host)

        ingest = data.get("dicomfleet_ingest", INGEST_AGENT)
        if ingest in (INGEST_AGENT, INGEST_SHARE) and "dicomfleet_watch_folders" not in data:
            report(host, "dicomfleet_watch_folders",
                   f"missing; a machine with ingest path {ingest!r} needs the absolute folders its agent watches")

        target = data.get("dicomfleet_orthanc")
        if target is None:
            if len(central_names) > 1:
                report(host, "dicomfleet_orthanc",
                       "missing; the inventory has several central hosts ("
                       + ", ".join(sorted(central_names)) + "), so name the one this machine sends to")
        elif target not in central_names:
            report(host, "dicomfleet_orthanc",
                   f"{_describe(target)} is not a host of the group '{CENTRAL_GROUP}' (known: "
                   + (", ".join(sorted(central_names)) or "none") + ")")

    for entry in central:
        aet = entry.vars.get("dicomfleet_orthanc_aet", "ORTHANC")
        if isinstance(aet, str) and aet.strip().upper() in seen_aets:
            report(entry.name, "dicomfleet_orthanc_aet",
                   f"{aet!r} is also the AE title of host {seen_aets[aet.strip().upper()]}; "
                   "Orthanc's AE title must differ from every machine's")

    _validate_agent_hosts(raw, report)
    archive_checks.validate(raw, report)
    return problems


def _inside(path: str, folder: str) -> bool:
    path = path.rstrip("/") or "/"
    folder = folder.rstrip("/") or "/"
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _validate_agent_hosts(raw: RawInventory, report: Callable[[str, str, str], None]) -> None:
    """Check share hosts, after-send settings, and that no two machines of one agent watch the same folder."""
    fileservers = {e.name for e in raw.hosts.values() if FILESERVER_GROUP in e.groups}
    watched: dict[str, list[tuple[str, str]]] = {}
    for entry in raw.hosts.values():
        data = entry.vars
        if "dicomfleet_machine_id" not in data:
            continue
        host = entry.name
        ingest = data.get("dicomfleet_ingest", INGEST_AGENT)

        agent_host = host if ingest == INGEST_AGENT else None
        share_host = data.get("dicomfleet_share_host")
        if ingest == INGEST_SHARE:
            if share_host is None:
                report(host, "dicomfleet_share_host",
                       f"missing; a machine with ingest path 'share' names the file server host (group "
                       f"'{FILESERVER_GROUP}') whose agent watches its subfolder")
            elif share_host not in raw.hosts:
                report(host, "dicomfleet_share_host", f"{_describe(share_host)} is not a host of the inventory")
            elif share_host not in fileservers:
                report(host, "dicomfleet_share_host",
                       f"{_describe(share_host)} is not in the group '{FILESERVER_GROUP}'; put the file server there")
            else:
                agent_host = share_host
        elif share_host is not None:
            report(host, "dicomfleet_share_host", f"is set, but the ingest path is {ingest!r}, not 'share'")

        after_send = data.get("dicomfleet_after_send", "keep")
        archive = data.get("dicomfleet_archive_folder")
        folders = data.get("dicomfleet_watch_folders")
        folders = [f for f in folders if isinstance(f, str)] if isinstance(folders, list) else []
        if after_send == "archive" and not archive:
            report(host, "dicomfleet_archive_folder",
                   "missing; dicomfleet_after_send 'archive' needs the absolute folder sent files are moved to")
        if isinstance(archive, str) and any(_inside(archive, f) or _inside(f, archive) for f in folders):
            report(host, "dicomfleet_archive_folder",
                   f"{_describe(archive)} overlaps a watch folder; archived files would be sent again, "
                   "so choose a folder outside dicomfleet_watch_folders")

        if agent_host is None:
            continue
        for folder in folders:
            for other_host, other_folder in watched.get(agent_host, []):
                if _inside(folder, other_folder) or _inside(other_folder, folder):
                    report(host, "dicomfleet_watch_folders",
                           f"{folder!r} overlaps the watch folder {other_folder!r} of host {other_host} on the "
                           f"same agent host {agent_host}; give each machine its own folder")
            watched.setdefault(agent_host, []).append((host, folder))


def ae_problem_free(value: str) -> bool:
    """Return True when VALUE is a valid AE title."""
    return ae_title_problem(value) is None
