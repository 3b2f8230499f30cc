"""Rebuild a fresh Orthanc from a backup made by ``dicomfleet backup``.

``dicomfleet restore --config /etc/dicomfleet/backup.toml`` copies the chosen storage
snapshot into the empty storage folder, puts the chosen index backup in place (or
restores the PostgreSQL dump into the cluster's database), and then checks that
every file the index names is present with its recorded size and MD5.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from dicomfleet.backup import (
    INDEX_POSTGRESQL,
    INDEX_SQLITE,
    BackupConfig,
    BackupError,
    complete_backups,
    load_config,
)

log = logging.getLogger(__name__)

# How many missing or damaged files the summary names before it only counts them.
LISTED_PROBLEMS = 20


@dataclasses.dataclass(frozen=True)
class Attachment:
    """A file that Orthanc's index expects in the storage folder."""

    uuid: str
    size: int
    md5: str
    instance: str


@dataclasses.dataclass
class RestoreReport:
    """What a restore put in place and what it found missing or damaged."""

    index_backup: Path
    storage_snapshot: Path | None
    files_copied: int = 0
    instances: int = 0
    attachments: int = 0
    missing: list[Attachment] = dataclasses.field(default_factory=list)
    damaged: list[Attachment] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every file the index names is present and intact."""
        return not self.missing and not self.damaged


def attachment_path(storage: Path, uuid: str) -> Path:
    """Return where Orthanc's filesystem storage keeps the attachment UUID (two levels of folders)."""
    return storage / uuid[0:2] / uuid[2:4] / uuid


def _choose(folder: Path, suffix: str, wanted: str | None, what: str) -> Path:
    if wanted:
        path = Path(wanted)
        if not path.is_absolute():
            path = folder / wanted
        if not path.exists():
            raise BackupError(f"The {what} {path} does not exist; list {folder} for the available ones.")
        return path

    found = complete_backups(folder, suffix)
    if not found:
        raise BackupError(f"No {what} was found in {folder}; check [target] folder in the configuration.")
    return found[-1]


def _check_stopped(config: BackupConfig) -> None:
    """Raise BackupError when systemd reports the Orthanc unit as running."""
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return
    result = subprocess.run(["systemctl", "is-active", "--quiet", config.unit])
    if result.returncode == 0:
        raise BackupError(f"{config.unit} is running; stop it (systemctl stop {config.unit}) before a restore, "
                          "and on every other node of a cluster.")


def _check_empty(folder: Path, config: BackupConfig) -> None:
    if folder.exists() and any(folder.iterdir()):
        raise BackupError(f"{folder} is not empty; a restore rebuilds a fresh Orthanc, so move the folder "
                          "away (keep it until the restored Orthanc is checked) and run the restore again.")


def _chown_tree(folder: Path, owner: str) -> None:
    if not owner:
        return
    for path in [folder, *folder.rglob("*")]:
        shutil.chown(path, owner, owner)


def copy_snapshot(snapshot: Path, storage: Path) -> int:
    """Copy every file of the storage SNAPSHOT into STORAGE; return the number of files."""
    copied = 0
    for folder, subfolders, names in os.walk(snapshot):
        subfolders.sort()
        target_folder = storage / Path(folder).relative_to(snapshot)
        target_folder.mkdir(parents=True, exist_ok=True)
        for name in sorted(names):
            shutil.copy2(Path(folder) / name, target_folder / name)
            copied += 1
    return copied


def sqlite_attachments(index: Path) -> tuple[int, list[Attachment]]:
    """Return the instance count and every attachment named by the Orthanc SQLite index INDEX."""
    connection = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        instances = connection.execute("SELECT COUNT(*) FROM Resources WHERE resourceType = 4").fetchone()[0]
        rows = connection.execute(
            "SELECT a.uuid, a.compressedSize, a.compressedMD5, r.publicId "
            "FROM AttachedFiles a JOIN Resources r ON r.internalId = a.id").fetchall()
    finally:
        connection.close()
    return instances, [Attachment(uuid, size, md5 or "", instance) for uuid, size, md5, instance in rows]


def postgresql_attachments(config: BackupConfig) -> tuple[int, list[Attachment]]:
    """Return the instance count and every attachment named by the cluster's PostgreSQL index."""
    database = config.postgresql
    query = ("SELECT 'I', COUNT(*), '', '' FROM Resources WHERE resourceType = 3 UNION ALL "
             "SELECT 'A', a.compressedSize, a.uuid || ' ' || COALESCE(a.compressedHash, ''), r.publicId "
             "FROM AttachedFiles a JOIN Resources r ON r.internalId = a.id")
    result = subprocess.run(["psql", *database.connection_arguments(), "--dbname", database.database,
                             "--no-psqlrc", "--tuples-only", "--no-align", "--field-separator", "\t",
                             "--command", query],
                            env=database.environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise BackupError(f"Reading the attachments of database {database.database} failed: "
                          f"{result.stderr.strip()}")

    instances = 0
    attachments = []
    for line in result.stdout.splitlines():
        kind, number, detail, instance = line.split("\t")
        if kind == "I":
            instances = int(number)
            continue
        uuid, _, md5 = detail.partition(" ")
        attachments.append(Attachment(uuid, int(number), md5, instance))
    return instances, attachments


def verify_attachments(storage: Path, attachments: list[Attachment], report: RestoreReport) -> None:
    """Record in REPORT each attachment that is missing from STORAGE or has another size or MD5."""
    for attachment in attachments:
        path = attachment_path(storage, attachment.uuid)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            report.missing.append(attachment)
            continue
        if size != attachment.size:
            report.damaged.append(attachment)
            continue
        if attachment.md5:
            digest = hashlib.md5()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != attachment.md5:
                report.damaged.append(attachment)


def restore_postgresql(config: BackupConfig, dump: Path) -> None:
    """Restore the pg_dump file DUMP into the cluster's database, replacing its tables."""
    database = config.postgresql
    command = ["pg_restore", *database.connection_arguments(), "--dbname", database.database,
               "--clean", "--if-exists", "--no-owner", "--no-privileges", "--exit-on-error", str(dump)]
    result = subprocess.run(command, env=database.environment(), capture_output=True, text=True)
    if result.returncode != 0:
        raise BackupError(f"pg_restore of {dump} into database {database.database} on "
                          f"{database.host}:{database.port} failed: {result.stderr.strip()}")


def restore(config: BackupConfig, index_name: str | None = None, snapshot_name: str | None = None) -> RestoreReport:
    """Rebuild Orthanc's index and storage from the backups; return what was restored and checked.

    The newest index backup and storage snapshot are used unless INDEX_NAME or
    SNAPSHOT_NAME choose others. The storage folder (and, for SQLite, the index
    folder) must be empty, and Orthanc stopped.
    """
    _check_stopped(config)
    index_backup = _choose(config.index_folder, config.index_suffix, index_name, "index backup")
    snapshots = complete_backups(config.storage_folder, "Z")
    snapshot = _choose(config.storage_folder, "Z", snapshot_name, "storage snapshot") \
        if snapshots or snapshot_name else None

    _check_empty(config.storage_directory, config)
    if config.index_kind == INDEX_SQLITE and config.index_directory.resolve() != config.storage_directory.resolve():
        _check_empty(config.index_directory, config)

    report = RestoreReport(index_backup=index_backup, storage_snapshot=snapshot)
    log.info("Restoring Orthanc from the index backup %s and the storage snapshot %s",
             index_backup, snapshot or "(none)")

    config.storage_directory.mkdir(parents=True, exist_ok=True)
    if snapshot is not None:
        report.files_copied = copy_snapshot(snapshot, config.storage_directory)

    if config.index_kind == INDEX_SQLITE:
        config.index_directory.mkdir(parents=True, exist_ok=True)
        restored_index = config.index_directory / "index"
        shutil.copyfile(index_backup, restored_index)
        instances, attachments = sqlite_attachments(restored_index)
        _chown_tree(config.index_directory, config.owner)
    else:
        restore_postgresql(config, index_backup)
        instances, attachments = postgresql_attachments(config)
    _chown_tree(config.storage_directory, config.owner)

    report.instances = instances
    report.attachments = len(attachments)
    verify_attachments(config.storage_directory, attachments, report)
    for problem, entries in (("missing", report.missing), ("damaged", report.damaged)):
        for attachment in entries[:LISTED_PROBLEMS]:
            log.warning("Attachment %s of instance %s is %s in the restored storage", attachment.uuid,
                        attachment.instance, problem)
    log.info("Restored %d instances and %d attachments (%d files copied); %d missing, %d damaged",
             report.instances, report.attachments, report.files_copied, len(report.missing), len(report.damaged))
    return report


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet restore", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True,
                        help="backup configuration (TOML), for example /etc/dicomfleet/backup.toml")
    parser.add_argument("--index", help="index backup to restore, a file name in the index folder or a path "
                        "(default: the newest)")
    parser.add_argument("--snapshot", help="storage snapshot to restore, a folder name or a path "
                        "(default: the newest)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def main(args: list[str] | None = None) -> int:
    """Run ``dicomfleet restore``; exit 1 when the restore failed or left files missing or damaged."""
    options = _build_parser().parse_args(args)
    logging.basicConfig(level=options.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        report = restore(load_config(options.config), options.index, options.snapshot)
    except BackupError as error:
        log.error("%s", error)
        return 1

    print(f"Restored {report.instances} instances from {report.index_backup} "
          f"and {report.files_copied} files from {report.storage_snapshot or 'no storage snapshot'}.")
    if not report.complete:
        print(f"{len(report.missing)} attachments are missing and {len(report.damaged)} damaged: they arrived "
              "after the storage snapshot or were changed since. Send those studies again from their "
              "machines, or restore an older index backup.", file=sys.stderr)
        return 1
    print(f"Every one of the {report.attachments} attachments is present with its recorded size and MD5. "
          f"Start {load_config(options.config).unit} now.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
