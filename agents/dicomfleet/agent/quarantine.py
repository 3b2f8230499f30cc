"""Move a file Orthanc cannot take into the quarantine folder, with a note saying why.

The file lands in ``QUARANTINE/<machine id>/<path relative to its watch folder>``
beside ``<name>.reason.txt``. A name clash gets a numbered suffix, and the file
is copied and synced before the original is removed, so it is never lost.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

REASON_SUFFIX = ".reason.txt"
MAX_SUFFIX = 10000


def _printable(path: str) -> str:
    """Return PATH as text even when its bytes are not UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def free_destination(preferred: Path) -> Path:
    """Return PREFERRED, or PREFERRED.1, PREFERRED.2 ... when the name (or its reason note) is taken."""
    candidate = preferred
    for number in range(1, MAX_SUFFIX):
        reason = candidate.with_name(candidate.name + REASON_SUFFIX)
        if not os.path.lexists(candidate) and not os.path.lexists(reason):
            return candidate
        candidate = preferred.with_name(f"{preferred.name}.{number}")
    raise FileExistsError(f"more than {MAX_SUFFIX} files named {preferred.name} are already in {preferred.parent}")


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def move_file(source: Path, destination: Path) -> None:
    """Move SOURCE to DESTINATION, copying across file systems without ever holding the only copy in flight."""
    try:
        os.link(source, destination)
    except OSError:
        # Another file system, or one without hard links: copy to a temporary
        # name, sync it, then give it the final name.
        temporary = destination.with_name(f".{destination.name}.partial")
        shutil.copy2(source, temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.rename(temporary, destination)

    _sync_folder(destination.parent)
    try:
        os.unlink(source)
    except OSError:
        # The original stays, so drop the copy rather than keep the file twice.
        destination.unlink(missing_ok=True)
        raise


def quarantine_file(quarantine_root: Path, machine_id: str, watch_folder: str, path: str,
                    reason: str, now: datetime.datetime | None = None) -> Path:
    """Move PATH into MACHINE_ID's quarantine folder and write its reason note; return the new path.

    Raises OSError when the file cannot be moved; the original then stays in place.
    """
    now = now or datetime.datetime.now().astimezone()
    relative = os.path.relpath(path, watch_folder)
    if relative.startswith(os.pardir):
        relative = os.path.basename(path)

    preferred = quarantine_root / machine_id / relative
    preferred.parent.mkdir(parents=True, exist_ok=True)
    destination = free_destination(preferred)

    note = (
        f"reason: {reason}\n"
        f"time: {now.isoformat(timespec='seconds')}\n"
        f"machine: {machine_id}\n"
        f"original path: {_printable(path)}\n"
    )
    reason_file = destination.with_name(destination.name + REASON_SUFFIX)
    reason_file.write_text(note, encoding="utf-8")

    try:
        move_file(Path(path), destination)
    except OSError:
        # The note would describe a file that is not there.
        reason_file.unlink(missing_ok=True)
        raise
    return destination
