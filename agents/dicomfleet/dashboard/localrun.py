"""Run the dashboard on this machine for tests, benchmarks and demos: config, secrets and the process.

The configuration is rendered from the project's template as the deploy
renders it, then pointed at loopback addresses and at secret files instead of
systemd credentials.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from dicomfleet import credentials, render
from dicomfleet.dashboard import rollout
from dicomfleet.inventory import OrthancServer, Site
from dicomfleet.localservers import free_port

log = logging.getLogger(__name__)


def _write_secret(folder: Path, name: str, value: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


def write_dashboard_config(site: Site, folder: Path, secrets: credentials.SiteSecrets, mongodb_uri: str,
                           port: int | None = None, database: str = "dicomfleet",
                           server: OrthancServer | None = None, settings: dict | None = None) -> Path:
    """Render SERVER's dashboard.toml for a local run on 127.0.0.1 and return its path.

    Secrets are written under FOLDER/dashboard-secrets and named with the
    ``*_file`` keys; the Orthanc URL is the local Orthanc's loopback port.
    SETTINGS are further keys of the [dashboard] table, such as activity_refresh_s.
    """
    server = server or next(iter(site.servers.values()))
    context = render.server_context(site, server, secrets)
    context = rollout.dashboard_context(site, server, secrets, context)
    context["dashboard"]["listen"] = "127.0.0.1"
    context["dashboard"]["port"] = port or free_port()
    context["mongodb_uri"] = mongodb_uri
    context["mongodb_database"] = database
    text = render.render_template("dashboard.toml.j2", context)

    secret_folder = folder / "dashboard-secrets"
    login = context["dashboard"]["login"]
    login_file = _write_secret(secret_folder, "dashboard-login", secrets.dashboard_password(login))
    key_file = _write_secret(secret_folder, "dashboard-session-key", secrets.dashboard_session_key())
    orthanc_file = _write_secret(secret_folder, "orthanc-dashboard",
                                 secrets.orthanc_password(credentials.DASHBOARD_USER))

    lines = []
    for line in text.splitlines():
        lines.append(line)
        if line.startswith("login = "):
            lines.append(f"login_password_file = {json.dumps(str(login_file))}")
            lines.append(f"session_key_file = {json.dumps(str(key_file))}")
            for key, value in (settings or {}).items():
                lines.append(f"{key} = {json.dumps(value)}")
        elif line == 'credential = "orthanc-dashboard"':
            lines.append(f"password_file = {json.dumps(str(orthanc_file))}")
    path = folder / f"dashboard-{server.host}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class DashboardProcess:
    """A dashboard running as a real subprocess on a loopback port, with its log in a file."""

    def __init__(self, config: Path, log_path: Path, port: int, log_level: str = "INFO"):
        self.config = config
        self.log_path = log_path
        self.port = port
        self.log_level = log_level
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self._log_handle = None

    def start(self, timeout: float = 30.0) -> "DashboardProcess":
        """Start the dashboard and wait until /healthz responds."""
        self._log_handle = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicomfleet", "dashboard", "--config", str(self.config),
             "--log-level", self.log_level],
            stdout=self._log_handle, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"The dashboard exited with status {self.process.returncode}; "
                                   f"see {self.log_path}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"The dashboard did not respond on {self.url} within {timeout} s; see {self.log_path}")

    def stop(self) -> int | None:
        """Stop the dashboard with SIGTERM and return its exit status."""
        status = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                status = self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                status = self.process.wait()
        elif self.process is not None:
            status = self.process.returncode
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        self.process = None
        return status

    def log_text(self) -> str:
        """Return everything the dashboard logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def port_of(config_path: Path) -> int:
    """Return the port written in the dashboard configuration CONFIG_PATH."""
    import tomllib

    return int(tomllib.loads(config_path.read_text(encoding="utf-8"))["dashboard"]["port"])
