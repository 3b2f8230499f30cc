"""Read a machine's Orthanc password from its systemd credential or its password file.

systemd's ``LoadCredential=`` puts the credential under ``$CREDENTIALS_DIRECTORY``;
``password_file`` serves local runs and tests. The password is never logged.
"""

from __future__ import annotations

import os
from pathlib import Path

from dicomfleet.agent.config import MachineConfig


class PasswordError(Exception):
    """Raised when no password can be read for a machine."""


def password_source(machine: MachineConfig) -> Path | None:
    """Return the file MACHINE's password is read from, or None when there is none."""
    credentials_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials_dir:
        candidate = Path(credentials_dir) / machine.credential
        if candidate.exists():
            return candidate
    if machine.password_file:
        return Path(machine.password_file)
    return None


def read_password(machine: MachineConfig) -> str:
    """Return MACHINE's Orthanc password; raise PasswordError saying where it was looked for."""
    source = password_source(machine)
    if source is None:
        where = os.environ.get("CREDENTIALS_DIRECTORY")
        looked = f"$CREDENTIALS_DIRECTORY/{machine.credential}" if where else "no $CREDENTIALS_DIRECTORY"
        raise PasswordError(
            f"No Orthanc password for machine {machine.id!r}: {looked} and no password_file in the "
            f"configuration; add LoadCredential={machine.credential}:FILE to the unit or set password_file.")

    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PasswordError(
            f"Cannot read the Orthanc password of machine {machine.id!r} from {source}: {error}.") from error

    password = text.strip("\r\n")
    if not password:
        raise PasswordError(f"The Orthanc password file {source} of machine {machine.id!r} is empty.")
    return password
