"""Read and check the sync's TOML configuration, rendered from templates/sync.toml.j2.

Every problem is reported at start, naming the file, the key and the value found.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Callable

from dicomfleet.metrics_endpoint import ListenAddress, listen_problem, parse_listen
from dicomfleet.validation import MODALITIES, address_problem, ae_title_problem

PATIENT_ID_DICOM = "dicom"
PATIENT_ID_PLACEHOLDER = "placeholder"
PATIENT_ID_POLICIES = (PATIENT_ID_DICOM, PATIENT_ID_PLACEHOLDER)

ON_DELETE_MARK = "mark"
ON_DELETE_REMOVE = "remove"
ON_DELETE_POLICIES = (ON_DELETE_MARK, ON_DELETE_REMOVE)

DEFAULT_RECONCILE_INTERVAL_S = 900.0

_MACHINE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class ConfigError(Exception):
    """Raised when the sync's configuration cannot be read or has invalid values."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclasses.dataclass(frozen=True)
class OrthancSource:
    """The Orthanc server whose change feed the sync follows."""

    name: str
    url: str
    public_url: str
    username: str
    credential: str
    password_file: Path | None

    def read_password(self) -> str:
        """Read the Orthanc password from the systemd credential, else from password_file.

        systemd's ``LoadCredential=`` puts the credential in ``$CREDENTIALS_DIRECTORY``;
        ``password_file`` serves local runs and tests.
        """
        candidates = []
        credentials_directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if credentials_directory:
            candidates.append(Path(credentials_directory) / self.credential)
        if self.password_file is not None:
            candidates.append(self.password_file)

        for path in candidates:
            try:
                password = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                continue
            except OSError as error:
                raise ConfigError([f"{path}: cannot read the Orthanc password of user "
                                   f"{self.username!r}: {error.strerror}."]) from error
            if not password:
                raise ConfigError([f"{path}: the Orthanc password file of user {self.username!r} "
                                   "is empty; write the password into it."])
            return password

        tried = ", ".join(str(path) for path in candidates) or "nothing"
        raise ConfigError([
            f"No Orthanc password found for user {self.username!r} (tried {tried}). Start the "
            f"sync with systemd's LoadCredential={self.credential}:... or set [orthanc] password_file."
        ])


@dataclasses.dataclass(frozen=True)
class MongoSettings:
    """The MongoDB server and database of the sync's records and checkpoints."""

    uri: str
    database: str


@dataclasses.dataclass(frozen=True)
class RecordPolicy:
    """The rules for writing and deleting study records."""

    patient_id_policy: str
    patient_id_placeholder: str
    on_delete: str


@dataclasses.dataclass(frozen=True)
class MachineEntry:
    """An imaging machine of the inventory, as the sync needs it to name a study's source."""

    id: str
    ae_title: str
    address: str
    modality: str
    username: str


@dataclasses.dataclass(frozen=True)
class SyncConfig:
    """The whole configuration of one sync service."""

    path: Path
    orthanc: OrthancSource
    mongodb: MongoSettings
    records: RecordPolicy
    machines: tuple[MachineEntry, ...]
    # Seconds between full reconciles while the service runs; 0 turns them off.
    reconcile_interval_s: float
    # Where the Prometheus metrics are served, or None when [metrics] is absent or its port is 0.
    metrics_listen: ListenAddress | None = None


def _string_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty string"
    return None


def _url_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not re.match(r"^https?://[^\s/]+(/\S*)?$", value):
        return "must be an http:// or https:// URL such as \"http://127.0.0.1:8042\""
    return None


def _mongodb_uri_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not re.match(r"^mongodb(\+srv)?://\S+$", value):
        return "must be a URI starting with mongodb:// or mongodb+srv://"
    return None


def _absolute_path_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith("/"):
        return "must be an absolute file path"
    return None


def _credential_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9_.-]{1,255}$", value) or value in (".", ".."):
        return "must be a systemd credential name: letters, digits, '_', '-' or '.'"
    return None


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value not in choices:
            return "is not one of " + ", ".join(repr(choice) for choice in choices)
        return None

    return check


def _interval_problem(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return "must be a number of seconds, 0 or more (0 turns periodic reconciles off)"
    return None


def _machine_id_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not _MACHINE_ID.match(value):
        return "must be 1 to 32 characters of lowercase letters, digits, '-' or '_'"
    return None


def _ae_title_problem(value: Any) -> str | None:
    problem = ae_title_problem(value)
    if problem:
        return f"{problem} (an AE title is 1 to 16 characters of the DICOM default repertoire)"
    return None


def _address_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be an IP address or a host name"
    return address_problem(value)


def _modality_problem(value: Any) -> str | None:
    if value not in MODALITIES:
        return "is not a DICOM modality defined term (for example CT, MR, CR, DX, US)"
    return None


# Each table's keys: name -> (check, required, default).
_ORTHANC_KEYS = {
    "name": (_string_problem, True, None),
    "url": (_url_problem, True, None),
    "public_url": (_url_problem, True, None),
    "username": (_string_problem, True, None),
    "credential": (_credential_problem, True, None),
    "password_file": (_absolute_path_problem, False, None),
}
_MONGODB_KEYS = {
    "uri": (_mongodb_uri_problem, True, None),
    "database": (_string_problem, True, None),
}
_RECORDS_KEYS = {
    "patient_id_policy": (_choice(PATIENT_ID_POLICIES), False, PATIENT_ID_DICOM),
    "patient_id_placeholder": (_string_problem, False, "NA"),
    "on_delete": (_choice(ON_DELETE_POLICIES), False, ON_DELETE_MARK),
}
_RECONCILE_KEYS = {
    "interval_s": (_interval_problem, False, DEFAULT_RECONCILE_INTERVAL_S),
}
_METRICS_KEYS = {
    "listen": (listen_problem, True, None),
}
_MACHINE_KEYS = {
    "id": (_machine_id_problem, True, None),
    "ae_title": (_ae_title_problem, True, None),
    "address": (_address_problem, True, None),
    "modality": (_modality_problem, True, None),
    "username": (_string_problem, True, None),
}
_TABLES = {
    "orthanc": _ORTHANC_KEYS,
    "mongodb": _MONGODB_KEYS,
    "records": _RECORDS_KEYS,
    "reconcile": _RECONCILE_KEYS,
    "metrics": _METRICS_KEYS,
}
_REQUIRED_TABLES = ("orthanc", "mongodb")
# Tables that are left out, not filled with defaults, when the file lacks them.
_OPTIONAL_TABLES = ("metrics",)


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
            known = ", ".join(keys)
            problems.append(f"{where}: {label} {key}: unknown key; the known keys are {known}.")

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


def _check_machines(where: str, entries: Any, problems: list[str]) -> list[dict[str, Any]]:
    if not isinstance(entries, list):
        problems.append(f"{where}: machine must be an array of tables written as [[machine]].")
        return []

    machines = []
    seen: dict[str, dict[str, int]] = {"id": {}, "username": {}, "ae_title": {}}
    for index, entry in enumerate(entries, start=1):
        values = _check_table(where, f"[[machine]] number {index}", entry, _MACHINE_KEYS, problems)
        if not values:
            continue
        for key, numbers in seen.items():
            value = values.get(key)
            if not isinstance(value, str):
                continue
            # Orthanc compares AE titles without regard to case by default.
            normalized = value.strip().upper() if key == "ae_title" else value
            if normalized in numbers:
                problems.append(f"{where}: [[machine]] number {index} {key}: {_describe(value)} is "
                                f"also used by [[machine]] number {numbers[normalized]}; it must be unique.")
            numbers.setdefault(normalized, index)
        machines.append(values)
    return machines


def parse_config(text: str, path: Path) -> SyncConfig:
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
    for table in _REQUIRED_TABLES:
        if table not in document:
            problems.append(f"{where}: [{table}]: missing; this table is required.")

    tables = {}
    for table, keys in _TABLES.items():
        if table not in document and (table in _REQUIRED_TABLES or table in _OPTIONAL_TABLES):
            continue
        tables[table] = _check_table(where, f"[{table}]", document.get(table, {}), keys, problems)
    machines = _check_machines(where, document.get("machine", []), problems)

    if problems:
        raise ConfigError(problems)

    orthanc = tables["orthanc"]
    password_file = orthanc["password_file"]
    records = tables["records"]
    return SyncConfig(
        path=path,
        orthanc=OrthancSource(
            name=orthanc["name"],
            url=orthanc["url"].rstrip("/"),
            public_url=orthanc["public_url"],
            username=orthanc["username"],
            credential=orthanc["credential"],
            password_file=Path(password_file) if password_file else None,
        ),
        mongodb=MongoSettings(uri=tables["mongodb"]["uri"], database=tables["mongodb"]["database"]),
        records=RecordPolicy(
            patient_id_policy=records["patient_id_policy"],
            patient_id_placeholder=records["patient_id_placeholder"],
            on_delete=records["on_delete"],
        ),
        machines=tuple(MachineEntry(**machine) for machine in machines),
        reconcile_interval_s=float(tables["reconcile"]["interval_s"]),
        metrics_listen=parse_listen(tables["metrics"]["listen"]) if "metrics" in tables else None,
    )


def load_config(path: str | os.PathLike) -> SyncConfig:
    """Read and check the sync configuration at PATH; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read the sync configuration: {error.strerror}."]) from error
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: the sync configuration is not UTF-8 text: {error}."]) from error
    return parse_config(text, path)
