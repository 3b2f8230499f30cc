"""Apply a machine's after-send policy: keep, archive or delete a file that Orthanc stored.

A file is moved or deleted only after Orthanc's stored copy is verified: the MD5 Orthanc
reports for it equals the MD5 of the bytes the agent sent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from dicomfleet.agent import quarantine, rest
from dicomfleet.agent.config import AFTER_SEND_ARCHIVE, AFTER_SEND_DELETE, TRANSPORT_CSTORE, MachineConfig
from dicomfleet.agent.httpclient import HttpClient

BLOCK = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class FileDigests:
    """Digests of a file read once: SHA-256 of all of it, MD5 of the bytes from an offset on."""

    sha256: str
    md5: str


def file_digests(path: str, md5_from: int | None = 0) -> FileDigests:
    """Return the SHA-256 of the file PATH and the MD5 of its bytes from MD5_FROM on, in one read.

    With MD5_FROM None no MD5 is computed, and ``md5`` is empty.
    """
    sha256 = hashlib.sha256()
    md5 = hashlib.md5() if md5_from is not None else None
    position = 0
    with open(path, "rb") as handle:
        while True:
            data = handle.read(BLOCK)
            if not data:
                break
            sha256.update(data)
            if md5 is not None and position + len(data) > md5_from:
                md5.update(data[max(0, md5_from - position):])
            position += len(data)
    return FileDigests(sha256.hexdigest(), md5.hexdigest() if md5 is not None else "")


class VerificationFailed(Exception):
    """Orthanc's stored copy does not have the MD5 of the file that was sent."""


def verify_stored(client: HttpClient, target: rest.OrthancTarget, machine: MachineConfig,
                  instance_id: str, expected_md5: str) -> None:
    """Raise VerificationFailed unless Orthanc's copy of INSTANCE_ID has EXPECTED_MD5.

    A REST upload is stored byte for byte, so the attachment's MD5 is compared. For
    C-STORE Orthanc writes its own file meta information, so EXPECTED_MD5 covers the
    data set only and is compared with the stored file's data set.
    Raises rest.InstanceNotFound when Orthanc has no instance INSTANCE_ID, and
    rest.TransientError or rest.AuthError when Orthanc cannot be asked.
    """
    if machine.transport == TRANSPORT_CSTORE:
        stored = rest.stored_dataset_md5(client, target, instance_id)
        what = "data set"
    else:
        stored = rest.stored_md5(client, target, instance_id)
        what = "file"
    if stored != expected_md5:
        raise VerificationFailed(f"Orthanc's stored {what} of instance {instance_id} has MD5 {stored}, but the sent "
                                 f"{what} has MD5 {expected_md5}")


def apply_policy(machine: MachineConfig, path: str) -> str | None:
    """Archive or delete the verified file PATH by MACHINE's policy; return the archive path, or None.

    Raises OSError when the file cannot be moved or deleted; it then stays in place.
    """
    if machine.after_send == AFTER_SEND_DELETE:
        os.unlink(path)
        return None

    if machine.after_send == AFTER_SEND_ARCHIVE:
        watch_folder = machine.watch_folder_of(path)
        relative = os.path.relpath(path, watch_folder)
        if relative.startswith(os.pardir):
            relative = os.path.basename(path)
        preferred = Path(machine.archive_folder) / relative
        preferred.parent.mkdir(parents=True, exist_ok=True)
        destination = quarantine.free_destination(preferred)
        quarantine.move_file(Path(path), destination)
        return str(destination)

    return None
