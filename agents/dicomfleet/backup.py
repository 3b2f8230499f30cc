"""Back up Orthanc's index and storage into a backup folder, keeping a number of copies.

``dicomfleet backup index`` copies the SQLite index with SQLite's backup API, or
dumps a cluster's PostgreSQL index with ``pg_dump``. ``dicomfleet backup storage``
snapshots the storage folder and hard-links the files that did not change since the
last snapshot. The systemd timers rendered from templates/dicomfleet-backup-*.j2 run both.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

log = logging.getLogger(__name__)

INDEX_SQLITE = "sqlite"
INDEX_POSTGRESQL = "postgresql"

PARTIAL = ".partial"
# Orthanc's filesystem storage keeps each attachment at XX/YY/UUID, where XXYY starts the UUID.
_ATTACHMENT_PATH = re.compile(r"^([0-9a-f]{2})/([0-9a-f]{2})/\1\2[0-9a-f-]{32,}$")


class BackupError(Exception):
    """Raised when a backup or a restore cannot be made; the message names what to do."""


@dataclasses.dataclass(frozen=True)
class PostgreSQLIndex:
    """The location of a cluster's PostgreSQL index and the login to it."""

    host: str
    port: int
    database: str
    username: str
    credential: str
    pgpass_file: str

    def pgpass(self) -> str:
        """Return the path of the pgpass file: the systemd credential, else the configured file."""
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if directory and (Path(directory) / self.credential).is_file():
            return str(Path(directory) / self.credential)
        return self.pgpass_file

    def environment(self) -> dict[str, str]:
        """Return the environment for libpq tools: the pgpass file and TLS required."""
        return dict(os.environ, PGPASSFILE=self.pgpass(), PGSSLMODE="require", PGCONNECT_TIMEOUT="10")

    def connection_arguments(self) -> list[str]:
        """Return the libpq tool arguments naming the server, the user and no password prompt."""
        return ["--host", self.host, "--port", str(self.port), "--username", self.username, "--no-password"]


@dataclasses.dataclass(frozen=True)
class BackupConfig:
    """The settings of ``dicomfleet backup`` and ``dicomfleet restore`` on one host."""

    path: Path
    unit: str
    storage_directory: Path
    index_directory: Path
    owner: str
    target: Path
    index_kind: str
    index_keep: int
    storage_keep: int
    postgresql: PostgreSQLIndex | None

    @property
    def index_folder(self) -> Path:
        """The folder of the index backups."""
        return self.target / "index"

    @property
    def storage_folder(self) -> Path:
        """The folder of the storage snapshots."""
        return self.target / "storage"

    @property
    def index_suffix(self) -> str:
        """The file name suffix of an index backup."""
        return ".sqlite3" if self.index_kind == INDEX_SQLITE else ".pgdump"


def _require(table: dict, key: str, kind: type, path: Path, section: str):
    if key not in table:
        raise BackupError(f"{path}: [{section}] {key} is missing; render the file again with 'dicomfleet deploy'.")
    value = table[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BackupError(f"{path}: [{section}] {key} = {value!r} must be a whole number of 1 or more.")
    if kind is str and (not isinstance(value, str) or not value):
        raise BackupError(f"{path}: [{section}] {key} = {value!r} must be a non-empty string.")
    return value


def load_config(path: str | os.PathLike) -> BackupConfig:
    """Read the backup configuration at PATH (rendered from templates/backup.toml.j2)."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise BackupError(f"Cannot read the backup configuration {path}: {error.strerror}.") from error
    except tomllib.TOMLDecodeError as error:
        raise BackupError(f"{path} is not valid TOML: {error}.") from error

    orthanc = document.get("orthanc", {})
    index = document.get("index", {})
    storage = document.get("storage", {})
    target = document.get("target", {})

    kind = _require(index, "kind", str, path, "index")
    if kind not in (INDEX_SQLITE, INDEX_POSTGRESQL):
        raise BackupError(f"{path}: [index] kind = {kind!r} must be {INDEX_SQLITE!r} or {INDEX_POSTGRESQL!r}.")

    postgresql = None
    if kind == INDEX_POSTGRESQL:
        postgresql = PostgreSQLIndex(
            host=_require(index, "host", str, path, "index"),
            port=_require(index, "port", int, path, "index"),
            database=_require(index, "database", str, path, "index"),
            username=_require(index, "username", str, path, "index"),
            credential=_require(index, "credential", str, path, "index"),
            pgpass_file=_require(index, "pgpass_file", str, path, "index"),
        )

    return BackupConfig(
        path=path,
        unit=str(orthanc.get("unit", "orthanc.service")),
        storage_directory=Path(_require(orthanc, "storage_directory", str, path, "orthanc")),
        index_directory=Path(_require(orthanc, "index_directory", str, path, "orthanc")),
        owner=str(orthanc.get("owner", "")),
        target=Path(_require(target, "folder", str, path, "target")),
        index_kind=kind,
        index_keep=_require(index, "keep", int, path, "index"),
        storage_keep=_require(storage, "keep", int, path, "storage"),
        postgresql=postgresql,
    )


def timestamp() -> str:
    """Return the current UTC time as a backup name, for example 20250102T023000Z."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def complete_backups(folder: Path, suffix: str) -> list[Path]:
    """Return the finished backups in FOLDER whose names end with SUFFIX, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(suffix) and PARTIAL not in p.name)


def _prune(backups: list[Path], keep: int, what: str) -> None:
    for old in backups[:-keep] if len(backups) > keep else []:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
        manifest = old.with_name(old.name.split(".")[0] + ".json")
        if manifest.exists() and manifest != old:
            manifest.unlink()
        log.info("Removed the old %s backup %s (keeping the newest %d)", what, old, keep)


def _write_manifest(path: Path, content: dict) -> None:
    partial = path.with_name(path.name + PARTIAL)
    partial.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)


# Index ---------------------------------------------------------------------------


def _sqlite_counts(connection: sqlite3.Connection) -> dict[str, int]:
    """Return the number of instances and attachments in an Orthanc SQLite index."""
    # Orthanc's ResourceType for instances is 4 (1 patient, 2 study, 3 series).
    instances = connection.execute("SELECT COUNT(*) FROM Resources WHERE resourceType = 4").fetchone()[0]
    attachments = connection.execute("SELECT COUNT(*) FROM AttachedFiles").fetchone()[0]
    return {"instances": instances, "attachments": attachments}


def backup_sqlite_index(config: BackupConfig, name: str) -> Path:
    """Copy the SQLite index with SQLite's backup API into the index folder; return the copy.

    Orthanc 1.10.1 keeps its index locked while it runs (a copy fails with
    "database is locked"), so the copy needs Orthanc stopped:
    dicomfleet-backup-index.service stops orthanc.service for the copy and
    starts it again afterwards.
    """
    source_path = config.index_directory / "index"
    if not source_path.is_file():
        raise BackupError(f"Orthanc's index {source_path} does not exist; check index_directory in "
                          f"{config.path}.")

    config.index_folder.mkdir(parents=True, exist_ok=True)
    final = config.index_folder / f"index-{name}{config.index_suffix}"
    partial = final.with_name(final.name + PARTIAL)
    partial.unlink(missing_ok=True)

    source = sqlite3.connect(str(source_path), timeout=5)
    try:
        # Connection.backup waits forever on a locked source, so a read finds the lock first.
        source.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        destination = sqlite3.connect(str(partial))
        try:
            source.backup(destination)
            check = destination.execute("PRAGMA integrity_check").fetchone()[0]
            counts = _sqlite_counts(destination)
        finally:
            destination.close()
    except sqlite3.OperationalError as error:
        partial.unlink(missing_ok=True)
        if "locked" in str(error):
            raise BackupError(
                f"Orthanc's index {source_path} is locked: Orthanc 1.10 keeps it locked while it runs. "
                f"Start dicomfleet-backup-index.service, which stops {config.unit} for the copy, "
                "or stop Orthanc first.") from error
        raise BackupError(f"Copying Orthanc's index {source_path} failed: {error}.") from error
    finally:
        source.close()

    if check != "ok":
        partial.unlink(missing_ok=True)
        raise BackupError(f"The copy of {source_path} failed SQLite's integrity check ({check}); "
                          "the source index may be damaged.")

    _fsync_file(partial)
    partial.replace(final)
    _fsync_folder(config.index_folder)
    _write_manifest(config.index_folder / f"index-{name}.json",
                    {"kind": INDEX_SQLITE, "source": str(source_path), **counts})
    log.info("Backed up the index %s into %s: %d instances, %d attachments",
             source_path, final, counts["instances"], counts["attachments"])
    return final


def backup_postgresql_index(config: BackupConfig, name: str) -> Path:
    """Dump the cluster's PostgreSQL index with pg_dump into the index folder; return the dump."""
    database = config.postgresql
    config.index_folder.mkdir(parents=True, exist_ok=True)
    final = config.index_folder / f"index-{name}{config.index_suffix}"
    partial = final.with_name(final.name + PARTIAL)
    partial.unlink(missing_ok=True)

    command = ["pg_dump", "--format=custom", *database.connection_arguments(),
               "--file", str(partial), database.database]
    result = subprocess.run(command, env=database.environment(), capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BackupError(f"pg_dump of database {database.database} on {database.host}:{database.port} "
                          f"failed with status {result.returncode}: {result.stderr.strip()}")

    listing = subprocess.run(["pg_restore", "--list", str(partial)], capture_output=True, text=True)
    if listing.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BackupError(f"The dump {partial} cannot be read back by pg_restore: {listing.stderr.strip()}")

    _fsync_file(partial)
    partial.replace(final)
    _fsync_folder(config.index_folder)
    _write_manifest(config.index_folder / f"index-{name}.json",
                    {"kind": INDEX_POSTGRESQL, "source": f"{database.host}:{database.port}/{database.database}"})
    log.info("Dumped the index database %s on %s:%d into %s", database.database, database.host,
             database.port, final)
    return final


def backup_index(config: BackupConfig, name: str | None = None) -> Path:
    """Back up Orthanc's index, then keep only the newest ``index.keep`` backups; return the new one."""
    name = name or timestamp()
    if config.index_kind == INDEX_SQLITE:
        backup_path = backup_sqlite_index(config, name)
    else:
        backup_path = backup_postgresql_index(config, name)
    _prune(complete_backups(config.index_folder, config.index_suffix), config.index_keep, "index")
    return backup_path


# Storage -------------------------------------------------------------------------


def storage_files(config: BackupConfig) -> list[Path]:
    """Return Orthanc's attachments below the storage folder, relative to it.

    Other files there are left out: the SQLite index when it shares the folder,
    and caches that plugins such as the Web viewer keep in the storage folder.
    """
    root = config.storage_directory
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        relative_folder = Path(folder).relative_to(root)
        for name in sorted(names):
            relative = relative_folder / name
            if _ATTACHMENT_PATH.match(relative.as_posix()) and (Path(folder) / name).is_file():
                found.append(relative)
    return found


def backup_storage(config: BackupConfig, name: str | None = None) -> Path:
    """Snapshot the storage folder; return the snapshot folder.

    Orthanc never rewrites a stored file, so a file whose path and size match the
    previous snapshot is hard-linked from it instead of copied. A file being
    written during the copy is copied again by the next snapshot, whose size
    then differs.
    """
    name = name or timestamp()
    root = config.storage_directory
    if not root.is_dir():
        raise BackupError(f"Orthanc's storage folder {root} does not exist; check storage_directory in "
                          f"{config.path}.")

    config.storage_folder.mkdir(parents=True, exist_ok=True)
    previous_snapshots = complete_backups(config.storage_folder, "Z")
    previous = previous_snapshots[-1] if previous_snapshots else None
    final = config.storage_folder / name
    partial = config.storage_folder / (name + PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)

    copied = linked = total_bytes = 0
    for relative in storage_files(config):
        source = root / relative
        target = partial / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            size = source.stat().st_size
        except FileNotFoundError:
            log.info("Skipping %s: Orthanc deleted it during the snapshot", source)
            continue

        earlier = previous / relative if previous else None
        if earlier is not None and earlier.is_file() and earlier.stat().st_size == size:
            os.link(earlier, target)
            linked += 1
        else:
            try:
                shutil.copy2(source, target)
            except FileNotFoundError:
                log.info("Skipping %s: Orthanc deleted it during the snapshot", source)
                continue
            copied += 1
        total_bytes += size

    partial.mkdir(parents=True, exist_ok=True)
    partial.replace(final)
    _fsync_folder(config.storage_folder)
    _write_manifest(config.storage_folder / f"{name}.json",
                    {"source": str(root), "files": copied + linked, "copied": copied, "linked": linked,
                     "bytes": total_bytes, "previous": previous.name if previous else None})
    log.info("Snapshot %s of %s: %d files (%d copied, %d hard-linked from %s), %d bytes",
             final, root, copied + linked, copied, linked, previous.name if previous else "none", total_bytes)
    _prune(complete_backups(config.storage_folder, "Z"), config.storage_keep, "storage")
    return final


# Command line ----------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet backup", description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("index", "storage"),
                        help="index: Orthanc's database; storage: the stored DICOM files")
    parser.add_argument("--config", required=True, help="backup configuration (TOML), "
                        "for example /etc/dicomfleet/backup.toml")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def main(args: list[str] | None = None) -> int:
    """Run ``dicomfleet backup index|storage``."""
    options = _build_parser().parse_args(args)
    logging.basicConfig(level=options.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(options.config)
        if options.part == "index":
            backup_index(config)
        else:
            backup_storage(config)
    except BackupError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
