"""Generate each site's secrets on the first deploy and reuse them afterwards.

Secrets live on the control machine in ``inventory/.secrets/SITE/`` (ignored by
git), one file per secret, mode 0600 in a folder of mode 0700. Hosts receive
them as root-only files that systemd hands to services with ``LoadCredential=``.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from dicomfleet.inventory import Site

log = logging.getLogger(__name__)

PLACEHOLDER = "(generated at first deploy)"

# Orthanc HTTP users that are not machines.
SYNC_USER = "dicomfleet-sync"
ADMIN_USER = "dicomfleet-admin"
DASHBOARD_USER = "dicomfleet-dashboard"

# The dashboard's login user when the inventory names none.
DEFAULT_DASHBOARD_LOGIN = "dicomfleet"


def default_secrets_dir(site: Site) -> Path:
    """Return the folder holding SITE's secrets, beside its inventory file."""
    override = os.environ.get("DICOMFLEET_SECRETS_DIR")
    if override:
        return Path(override) / site.name
    return site.path.resolve().parent / ".secrets" / site.name


# The first bytes of a file that ansible-vault encrypted.
VAULT_HEADER = "$ANSIBLE_VAULT;"


class SecretError(Exception):
    """A secret file exists but cannot be used as it is."""


class SiteSecrets:
    """The secrets of one site: Orthanc passwords, heartbeat tokens and the dashboard's login."""

    def __init__(self, folder: Path, create: bool):
        self.folder = folder
        self.create = create

    def read_file(self, path: Path) -> str:
        """Return the secret stored in PATH; raise FileNotFoundError when there is none.

        The Ansible roles override this to decrypt files encrypted with ansible-vault.
        """
        text = path.read_text(encoding="utf-8").strip()
        if text.startswith(VAULT_HEADER):
            raise SecretError(
                f"The secret file {path} is encrypted with ansible-vault, which the pyinfra deploy cannot "
                "decrypt. Deploy this site with playbook.yml and its vault password, or decrypt the "
                f"secrets first (ansible-vault decrypt {self.folder}/*).")
        return text

    def secret(self, name: str) -> str:
        """Return the secret NAME from this site's folder, generating it when allowed and missing."""
        path = self.folder / name
        try:
            return self.read_file(path)
        except FileNotFoundError:
            pass

        if not self.create:
            return PLACEHOLDER

        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        value = secrets.token_urlsafe(24)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(value + "\n")
        log.info("Generated secret %s in %s", name, self.folder)
        return value

    def orthanc_password(self, username: str) -> str:
        """Return the Orthanc HTTP password of USERNAME."""
        return self.secret(f"orthanc-{username}.password")

    def heartbeat_token(self, machine_id: str) -> str:
        """Return the token MACHINE_ID's agent presents with each heartbeat to the dashboard."""
        return self.secret(f"heartbeat-{machine_id}.token")

    def dashboard_password(self, login: str) -> str:
        """Return the password of the dashboard's login user LOGIN."""
        return self.secret(f"dashboard-{login}.password")

    def dashboard_session_key(self) -> str:
        """Return the key that signs the dashboard's session cookies."""
        return self.secret("dashboard-session.key")


def ensure_secrets(site: Site, folder: Path | None = None) -> SiteSecrets:
    """Return SITE's secrets, generating any that do not exist yet."""
    return SiteSecrets(folder or default_secrets_dir(site), create=True)


def existing_secrets(site: Site, folder: Path | None = None) -> SiteSecrets:
    """Return SITE's secrets without creating any; missing ones read as a placeholder."""
    return SiteSecrets(folder or default_secrets_dir(site), create=False)
