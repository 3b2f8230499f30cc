"""Read and check the dashboard's TOML configuration, rendered from templates/dashboard.toml.j2.

Every problem is reported at start, naming the file, the table, the key and the value found.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import zoneinfo
from pathlib import Path
from typing import Any, Callable

from dicomfleet.dashboard import workinghours

_MACHINE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_CREDENTIAL = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

INGEST_PATHS = ("agent", "share", "dicom")


class ConfigError(Exception):
    """Raised with every problem found in a dashboard configuration file."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def read_secret(credential: str, fallback: Path | None, what: str) -> str:
    """Read the secret CREDENTIAL from systemd's $CREDENTIALS_DIRECTORY, else from FALLBACK.

    WHAT names the secret in errors. Raises ConfigError when neither file
    exists or the one found is empty.
    """
    candidates = []
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory:
        candidates.append(Path(directory) / credential)
    if fallback is not None:
        candidates.append(fallback)

    for path in candidates:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except OSError as error:
            raise ConfigError([f"{path}: cannot read {what}: {error.strerror}."]) from error
        if not value:
            raise ConfigError([f"{path}: the file holding {what} is empty; write the secret into it."])
        return value

    tried = ", ".join(str(path) for path in candidates) or "nothing"
    raise ConfigError([f"No file holds {what} (tried {tried}). Start the dashboard with systemd's "
                       f"LoadCredential={credential}:... or set the matching *_file key."])


@dataclasses.dataclass(frozen=True)
class MachineSettings:
    """An imaging machine of the inventory as the dashboard shows and judges it."""

    id: str
    ae_title: str
    modality: str
    location: str
    host: str
    ingest: str
    transport: str
    watch_folders: tuple[str, ...]
    working_hours: workinghours.WorkingHours
    silent_after_s: float
    offline_after_s: float
    heartbeat_interval_s: float
    queue_warning_s: float
    free_space_warning_bytes: int
    # SHA-256 of the machine's heartbeat token; empty for a machine without an agent.
    token_sha256: str

    @property
    def sends_heartbeats(self) -> bool:
        """True when an agent sends this machine's images, and so its heartbeats."""
        return self.ingest != "dicom"


@dataclasses.dataclass(frozen=True)
class OrthancSettings:
    """The Orthanc server this dashboard watches, and the dashboard's own Orthanc user."""

    name: str
    url: str
    public_url: str
    username: str
    credential: str
    password_file: Path | None
    storage_directory: str
    disk_alert_percent: float


@dataclasses.dataclass(frozen=True)
class DashboardConfig:
    """The whole configuration of one dashboard service."""

    path: Path
    site: str
    listen: str
    port: int
    timezone: str
    login: str
    login_credential: str
    login_password_file: Path | None
    session_key_credential: str
    session_key_file: Path | None
    session_lifetime_s: float
    trusted_proxies: tuple[str, ...]
    max_heartbeat_bytes: int
    threads: int
    sync_lag_alert_s: float
    # Seconds between two runs of the study counts' aggregation; 0 runs it for every page.
    activity_refresh_s: float
    orthanc: OrthancSettings
    mongodb_uri: str
    mongodb_database: str
    machines: tuple[MachineSettings, ...]

    def zone(self) -> zoneinfo.ZoneInfo | None:
        """Return the site's time zone, or None for the host's local time."""
        return zoneinfo.ZoneInfo(self.timezone) if self.timezone else None

    def machine(self, machine_id: str) -> MachineSettings | None:
        """Return the machine MACHINE_ID, or None when the inventory has no such machine."""
        for machine in self.machines:
            if machine.id == machine_id:
                return machine
        return None


def _string(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    return None


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    return None


def _url(value: Any) -> str | None:
    if not isinstance(value, str) or not re.match(r"^https?://[^\s/]+(/\S*)?$", value):
        return "must be an http:// or https:// URL such as \"http://127.0.0.1:8042\""
    return None


def _mongodb_uri(value: Any) -> str | None:
    if not isinstance(value, str) or not re.match(r"^mongodb(\+srv)?://\S+$", value):
        return "must be a URI starting with mongodb:// or mongodb+srv://"
    return None


def _port(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        return "must be a TCP port from 1 to 65535 (0 picks a free port)"
    return None


def _address(value: Any) -> str | None:
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return "must be an IP address"
    return None


def _addresses(value: Any) -> str | None:
    if not isinstance(value, list):
        return "must be a list of IP addresses"
    for item in value:
        if _address(item):
            return f"contains {item!r}, which is not an IP address"
    return None


def _positive(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return "must be a number above 0"
    return None


def _non_negative(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return "must be a number, 0 or more"
    return None


def _whole(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return "must be a whole number above 0"
    return None


def _credential(value: Any) -> str | None:
    if not isinstance(value, str) or not _CREDENTIAL.match(value) or value in (".", ".."):
        return "must be a systemd credential name: letters, digits, '_', '-' or '.'"
    return None


def _optional_path(value: Any) -> str | None:
    if value == "":
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        return "must be an absolute file path or empty"
    return None


def _timezone(value: Any) -> str | None:
    if value == "":
        return None
    if not isinstance(value, str):
        return "must be an IANA time zone name or empty for the host's local time"
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return "is not an IANA time zone name known here (for example Europe/Paris)"
    return None


def _machine_id(value: Any) -> str | None:
    if not isinstance(value, str) or not _MACHINE_ID.match(value):
        return "must be 1 to 32 characters of lowercase letters, digits, '-' or '_'"
    return None


def _ingest(value: Any) -> str | None:
    if value not in INGEST_PATHS:
        return "is not one of " + ", ".join(repr(choice) for choice in INGEST_PATHS)
    return None


def _folders(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return "must be a list of folder paths"
    return None


def _token_digest(value: Any) -> str | None:
    if value == "":
        return None
    if not isinstance(value, str) or not _SHA256.match(value):
        return "must be 64 lowercase hexadecimal digits (a SHA-256) or empty"
    return None


def _working_hours(value: Any) -> str | None:
    return workinghours.problem(value)


Check = Callable[[Any], str | None]

# Each table's keys: name -> (check, required, default).
_DASHBOARD_KEYS: dict[str, tuple[Check, bool, Any]] = {
    "site": (_string, True, None),
    "listen": (_address, False, "127.0.0.1"),
    "port": (_port, False, 8050),
    "timezone": (_timezone, False, ""),
    "login": (_machine_id, True, None),
    "login_credential": (_credential, False, "dashboard-login"),
    "login_password_file": (_optional_path, False, ""),
    "session_key_credential": (_credential, False, "dashboard-session-key"),
    "session_key_file": (_optional_path, False, ""),
    "session_lifetime_s": (_positive, False, 12 * 3600),
    "trusted_proxies": (_addresses, False, ["127.0.0.1", "::1"]),
    "max_heartbeat_bytes": (_whole, False, 16384),
    "threads": (_whole, False, 8),
    "sync_lag_alert_s": (_positive, False, 600),
    "activity_refresh_s": (_non_negative, False, 5),
}
_ORTHANC_KEYS: dict[str, tuple[Check, bool, Any]] = {
    "name": (_string, True, None),
    "url": (_url, True, None),
    "public_url": (_url, True, None),
    "username": (_string, True, None),
    "credential": (_credential, False, "orthanc-dashboard"),
    "password_file": (_optional_path, False, ""),
    "storage_directory": (_optional_path, False, ""),
    "disk_alert_percent": (_positive, False, 85),
}
_MONGODB_KEYS: dict[str, tuple[Check, bool, Any]] = {
    "uri": (_mongodb_uri, True, None),
    "database": (_string, True, None),
}
_MACHINE_KEYS: dict[str, tuple[Check, bool, Any]] = {
    "id": (_machine_id, True, None),
    "ae_title": (_string, True, None),
    "modality": (_string, True, None),
    "location": (_text, False, ""),
    "host": (_string, True, None),
    "ingest": (_ingest, True, None),
    "transport": (_string, False, "rest"),
    "watch_folders": (_folders, False, []),
    "working_hours": (_working_hours, False, "always"),
    "silent_after_s": (_positive, False, 7200),
    "offline_after_s": (_positive, False, 120),
    "heartbeat_interval_s": (_positive, False, 30),
    "queue_warning_s": (_positive, False, 900),
    "free_space_warning_bytes": (_whole, False, 2 * 1024**3),
    "token_sha256": (_token_digest, False, ""),
}
_TABLES = {"dashboard": _DASHBOARD_KEYS, "orthanc": _ORTHANC_KEYS, "mongodb": _MONGODB_KEYS}


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text


def _check_table(where: str, label: str, data: Any, keys: dict, problems: list[str]) -> dict[str, Any]:
    """Check the TOML table LABEL against KEYS and return its values with defaults filled in."""
    if not isinstance(data, dict):
        problems.append(f"{where}: {label} must be a table, not {_describe(data)}.")
        return {}

    for key in data:
        if key not in keys:
            problems.append(f"{where}: {label} {key}: unknown key; the known keys are {', '.join(keys)}.")

    values: dict[str, Any] = {}
    for key, (check, required, default) in keys.items():
        if key not in data:
            if required:
                problems.append(f"{where}: {label} {key}: missing; this key is required.")
            values[key] = default
            continue
        problem = check(data[key])
        if problem:
            problems.append(f"{where}: {label} {key}: {_describe(data[key])} {problem}.")
        values[key] = data[key]
    return values


def _optional(value: str) -> Path | None:
    return Path(value) if value else None


def _machines(where: str, entries: Any, problems: list[str]) -> list[MachineSettings]:
    if not isinstance(entries, list):
        problems.append(f"{where}: machine must be an array of tables written as [[machine]].")
        return []

    machines = []
    seen: set[str] = set()
    for index, entry in enumerate(entries, start=1):
        label = f"[[machine]] {entry.get('id')}" if isinstance(entry, dict) else f"[[machine]] number {index}"
        before = len(problems)
        values = _check_table(where, label, entry, _MACHINE_KEYS, problems)
        if len(problems) > before:
            continue
        if values["id"] in seen:
            problems.append(f"{where}: {label}: the id is used by an earlier [[machine]]; ids are unique.")
            continue
        seen.add(values["id"])
        values["watch_folders"] = tuple(values["watch_folders"])
        values["working_hours"] = workinghours.parse(values["working_hours"])
        for key in ("silent_after_s", "offline_after_s", "heartbeat_interval_s", "queue_warning_s"):
            values[key] = float(values[key])
        machines.append(MachineSettings(**values))
    return machines


def parse_config(text: str, path: Path) -> DashboardConfig:
    """Parse and check the TOML TEXT read from PATH; raise ConfigError listing every problem."""
    where = str(path)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{where}: invalid TOML: {error}."]) from error

    problems: list[str] = []
    for table in document:
        if table not in _TABLES and table != "machine":
            known = ", ".join(f"[{name}]" for name in _TABLES) + ", [[machine]]"
            problems.append(f"{where}: [{table}]: unknown table; the known tables are {known}.")
    tables = {}
    for table, keys in _TABLES.items():
        if table not in document:
            problems.append(f"{where}: [{table}]: missing; this table is required.")
            continue
        tables[table] = _check_table(where, f"[{table}]", document[table], keys, problems)
    machines = _machines(where, document.get("machine", []), problems)

    if problems:
        raise ConfigError(problems)

    dashboard = tables["dashboard"]
    orthanc = tables["orthanc"]
    return DashboardConfig(
        path=path,
        site=dashboard["site"],
        listen=dashboard["listen"],
        port=dashboard["port"],
        timezone=dashboard["timezone"],
        login=dashboard["login"],
        login_credential=dashboard["login_credential"],
        login_password_file=_optional(dashboard["login_password_file"]),
        session_key_credential=dashboard["session_key_credential"],
        session_key_file=_optional(dashboard["session_key_file"]),
        session_lifetime_s=float(dashboard["session_lifetime_s"]),
        trusted_proxies=tuple(str(item) for item in dashboard["trusted_proxies"]),
        max_heartbeat_bytes=dashboard["max_heartbeat_bytes"],
        threads=dashboard["threads"],
        sync_lag_alert_s=float(dashboard["sync_lag_alert_s"]),
        activity_refresh_s=float(dashboard["activity_refresh_s"]),
        orthanc=OrthancSettings(
            name=orthanc["name"],
            url=orthanc["url"].rstrip("/"),
            public_url=orthanc["public_url"].rstrip("/"),
            username=orthanc["username"],
            credential=orthanc["credential"],
            password_file=_optional(orthanc["password_file"]),
            storage_directory=orthanc["storage_directory"],
            disk_alert_percent=float(orthanc["disk_alert_percent"]),
        ),
        mongodb_uri=tables["mongodb"]["uri"],
        mongodb_database=tables["mongodb"]["database"],
        machines=tuple(machines),
    )


def load_config(path: str | os.PathLike) -> DashboardConfig:
    """Read and check the dashboard configuration at PATH; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read the dashboard configuration: {error.strerror}."]) from error
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: the dashboard configuration is not UTF-8: {error}."]) from error
    return parse_config(text, path)
