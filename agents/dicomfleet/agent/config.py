"""Read and check the agent's TOML configuration (rendered from templates/agent.toml.j2).

Every unknown key and bad value is reported at start, naming the file, the key and the value.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from dicomfleet.agent.heartbeat import HeartbeatConfigError, HeartbeatSettings, parse_heartbeat_table
from dicomfleet.metrics_endpoint import ListenAddress, listen_problem, parse_listen
from dicomfleet.dicomterms import MODALITIES, ae_title_problem

TRANSPORT_REST = "rest"
TRANSPORT_CSTORE = "cstore"

AFTER_SEND_KEEP = "keep"
AFTER_SEND_ARCHIVE = "archive"
AFTER_SEND_DELETE = "delete"
AFTER_SEND_POLICIES = (AFTER_SEND_KEEP, AFTER_SEND_ARCHIVE, AFTER_SEND_DELETE)

_MACHINE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_CREDENTIAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")

MAX_WORKERS = 64


class ConfigError(Exception):
    """Raised with every problem found in an agent configuration file."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclasses.dataclass(frozen=True)
class MachineConfig:
    """One imaging machine whose export folders this agent watches."""

    id: str
    ae_title: str
    modality: str
    transport: str
    watch_folders: tuple[str, ...]
    polling: bool
    orthanc_url: str
    orthanc_aet: str
    orthanc_dicom_port: int
    username: str
    credential: str
    password_file: str | None = None
    # CA certificate file (PEM) that signs an https:// orthanc_url; None trusts the system's CAs.
    ca_file: str | None = None
    # Orthanc's DICOM address for transport = "cstore"; None takes the host of orthanc_url.
    orthanc_dicom_host: str | None = None
    # What happens to a file once Orthanc's stored copy is verified: keep, archive or delete.
    after_send: str = AFTER_SEND_KEEP
    archive_folder: str | None = None

    @property
    def dicom_host(self) -> str:
        """The address C-STORE associations go to."""
        return self.orthanc_dicom_host or (urlsplit(self.orthanc_url).hostname or "")

    def watch_folder_of(self, path: str) -> str:
        """Return the watch folder that contains PATH (the deepest one when folders nest)."""
        best = ""
        for folder in self.watch_folders:
            normal = os.path.normpath(folder)
            if (path == normal or path.startswith(normal.rstrip("/") + "/")) and len(normal) > len(best):
                best = normal
        return best or os.path.dirname(path)


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """The agent's settings and its machines."""

    path: Path
    spool: Path
    quarantine: Path
    status_file: Path
    rescan_interval_s: float
    quiet_time_s: float
    workers: int
    machines: tuple[MachineConfig, ...]
    # Where to send heartbeats; None when the configuration has no [heartbeat] table.
    heartbeat: HeartbeatSettings | None = None
    # Where the Prometheus metrics are served, or None when [metrics] is absent or its port is 0.
    metrics_listen: ListenAddress | None = None

    def machine(self, machine_id: str) -> MachineConfig:
        """Return the machine MACHINE_ID."""
        for machine in self.machines:
            if machine.id == machine_id:
                return machine
        raise KeyError(machine_id)


def _absolute_path(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith("/") or "\x00" in value:
        return "must be an absolute path"
    return None


def _positive_number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return "must be a number above 0"
    return None


def _worker_count(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        return f"must be a whole number from 1 to {MAX_WORKERS}"
    return None


def _machine_id(value: Any) -> str | None:
    if not isinstance(value, str) or not _MACHINE_ID.match(value):
        return ("must be 1 to 32 characters of lowercase letters, digits, '-' or '_', "
                "starting with a letter or digit")
    return None


def _ae_title(value: Any) -> str | None:
    problem = ae_title_problem(value)
    if problem:
        return f"{problem} (an AE title is 1 to 16 characters of the DICOM default repertoire)"
    return None


def _modality(value: Any) -> str | None:
    if value not in MODALITIES:
        return "is not a DICOM modality defined term (for example CT, MR, CR, DX, US, MG, XA)"
    return None


def _transport(value: Any) -> str | None:
    if value not in (TRANSPORT_REST, TRANSPORT_CSTORE):
        return f"must be {TRANSPORT_REST!r} or {TRANSPORT_CSTORE!r}"
    return None


def _folders(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of absolute folder paths"
    for folder in value:
        if _absolute_path(folder):
            return f"contains {folder!r}, which is not an absolute path"
    return None


def _boolean(value: Any) -> str | None:
    if not isinstance(value, bool):
        return "must be true or false"
    return None


def _url(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be an http:// or https:// URL"
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        return "must be an http:// or https:// URL without query or fragment"
    try:
        parts.port
    except ValueError:
        return "has an invalid port"
    return None


def _after_send(value: Any) -> str | None:
    if value not in AFTER_SEND_POLICIES:
        return "must be " + ", ".join(repr(policy) for policy in AFTER_SEND_POLICIES)
    return None


def _host(value: Any) -> str | None:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", value):
        return "must be an IP address or a host name"
    return None


def _port(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        return "must be a TCP port from 1 to 65535"
    return None


def _non_empty_string(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    return None


def _credential(value: Any) -> str | None:
    if not isinstance(value, str) or not _CREDENTIAL_NAME.match(value):
        return "must be a systemd credential name (letters, digits, '_', '.', '@' or '-', no '/')"
    return None


# key -> (check, required, default)
AGENT_KEYS: dict[str, tuple[Callable[[Any], str | None], bool, Any]] = {
    "spool": (_absolute_path, True, None),
    "quarantine": (_absolute_path, True, None),
    "status_file": (_absolute_path, True, None),
    "rescan_interval_s": (_positive_number, False, 60),
    "quiet_time_s": (_positive_number, False, 2.0),
    "workers": (_worker_count, False, 4),
}

METRICS_KEYS: dict[str, tuple[Callable[[Any], str | None], bool, Any]] = {
    "listen": (listen_problem, True, None),
}

MACHINE_KEYS: dict[str, tuple[Callable[[Any], str | None], bool, Any]] = {
    "id": (_machine_id, True, None),
    "ae_title": (_ae_title, True, None),
    "modality": (_modality, True, None),
    "transport": (_transport, False, TRANSPORT_REST),
    "watch_folders": (_folders, True, None),
    "polling": (_boolean, False, False),
    "orthanc_url": (_url, True, None),
    "orthanc_aet": (_ae_title, True, None),
    "orthanc_dicom_port": (_port, True, None),
    "username": (_non_empty_string, True, None),
    "credential": (_credential, True, None),
    "password_file": (_absolute_path, False, None),
    "ca_file": (_absolute_path, False, None),
    "orthanc_dicom_host": (_host, False, None),
    "after_send": (_after_send, False, AFTER_SEND_KEEP),
    "archive_folder": (_absolute_path, False, None),
}


def _check_table(table: dict, keys: dict, where: str, problems: list[str]) -> dict:
    """Check TABLE against KEYS; return the values with defaults filled in."""
    values = {}
    for key, value in table.items():
        if key not in keys:
            problems.append(f"{where}: unknown key {key!r} (known keys: {', '.join(keys)}).")
            continue
        check = keys[key][0]
        problem = check(value)
        if problem:
            problems.append(f"{where}: {key} = {value!r} {problem}.")
            continue
        values[key] = value

    for key, (_, required, default) in keys.items():
        if key in table:
            continue
        if required:
            problems.append(f"{where}: the key {key!r} is missing.")
        else:
            values[key] = default
    return values


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _check_folders(machines: list[MachineConfig], where: str, problems: list[str]) -> None:
    """Report a watch folder given twice, and an archive folder that a watcher would send again."""
    watched = [os.path.normpath(folder) for machine in machines for folder in machine.watch_folders]
    for machine in machines:
        if not machine.archive_folder:
            continue
        archive = os.path.normpath(machine.archive_folder)
        for folder in watched:
            if _inside(archive, folder) or _inside(folder, archive):
                problems.append(
                    f"{where}: the archive_folder {machine.archive_folder!r} of machine {machine.id!r} overlaps "
                    f"the watch folder {folder!r}; archived files would be sent again, so choose a folder "
                    "outside every watch folder.")
                break

    owners: dict[str, str] = {}
    for machine in machines:
        for folder in machine.watch_folders:
            normal = os.path.normpath(folder)
            if normal in owners:
                problems.append(
                    f"{where}: the watch folder {folder!r} of machine {machine.id!r} is also watched for "
                    f"machine {owners[normal]!r}; give each machine its own folder (a share uses one "
                    "subfolder per machine).")
                continue
            owners[normal] = machine.id


def _metrics_listen(table: Any, path: Path, problems: list[str]) -> ListenAddress | None:
    """Return the [metrics] listen address, or None when the table is absent or its port is 0."""
    if table is None:
        return None
    if not isinstance(table, dict):
        problems.append(f"{path}: metrics must be a table written as [metrics].")
        return None

    before = len(problems)
    values = _check_table(table, METRICS_KEYS, f"{path}: [metrics]", problems)
    if len(problems) > before:
        return None
    return parse_listen(values["listen"])


def parse_config(text: str, path: Path) -> AgentConfig:
    """Parse and check the agent configuration TEXT read from PATH."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{path}: invalid TOML: {error}."]) from error

    problems: list[str] = []
    for key in document:
        if key not in ("agent", "heartbeat", "metrics", "machine"):
            problems.append(f"{path}: unknown top-level key or table {key!r} (expected [agent], [heartbeat], "
                            "[metrics] and [[machine]]).")

    heartbeat = None
    if "heartbeat" in document:
        try:
            heartbeat = parse_heartbeat_table(document["heartbeat"], str(path))
        except HeartbeatConfigError as error:
            problems.extend(error.problems)

    agent_table = document.get("agent")
    if not isinstance(agent_table, dict):
        problems.append(f"{path}: the [agent] table is missing.")
        agent_table = {}
    agent = _check_table(agent_table, AGENT_KEYS, f"{path}: [agent]", problems)
    metrics_listen = _metrics_listen(document.get("metrics"), path, problems)

    machine_tables = document.get("machine")
    if not isinstance(machine_tables, list) or not machine_tables:
        problems.append(f"{path}: no [[machine]] table; the agent needs at least one machine to watch.")
        machine_tables = []

    machines: list[MachineConfig] = []
    seen_ids: set[str] = set()
    for number, table in enumerate(machine_tables, start=1):
        label = table.get("id") if isinstance(table.get("id"), str) else f"number {number}"
        where = f"{path}: [[machine]] {label}"
        before = len(problems)
        values = _check_table(table, MACHINE_KEYS, where, problems)
        if len(problems) > before:
            continue

        if values["id"] in seen_ids:
            problems.append(f"{where}: the id {values['id']!r} is used by an earlier [[machine]]; ids are unique.")
            continue
        seen_ids.add(values["id"])

        if values["after_send"] == AFTER_SEND_ARCHIVE and not values["archive_folder"]:
            problems.append(
                f"{where}: after_send = 'archive' needs archive_folder, the absolute folder that sent files of "
                f"machine {values['id']!r} are moved to (dicomfleet_archive_folder in the inventory).")
            continue

        values["watch_folders"] = tuple(values["watch_folders"])
        values["orthanc_url"] = values["orthanc_url"].rstrip("/")
        machines.append(MachineConfig(**values))

    _check_folders(machines, str(path), problems)
    if problems:
        raise ConfigError(problems)

    return AgentConfig(
        path=path,
        spool=Path(agent["spool"]),
        quarantine=Path(agent["quarantine"]),
        status_file=Path(agent["status_file"]),
        rescan_interval_s=float(agent["rescan_interval_s"]),
        quiet_time_s=float(agent["quiet_time_s"]),
        workers=int(agent["workers"]),
        machines=tuple(machines),
        heartbeat=heartbeat,
        metrics_listen=metrics_listen,
    )


def load_config(path: str | os.PathLike) -> AgentConfig:
    """Read and check the agent configuration file at PATH; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([f"{path}: cannot read the agent configuration: {error}."]) from error
    return parse_config(text, path)
