"""Start Orthanc and SecantusDB as local processes on loopback ports.

Tests and benchmarks run the real servers this way: Orthanc from Debian's
package with a configuration rendered from the project's own templates, and
SecantusDB (a MongoDB-wire-protocol server) reached with pymongo. Every
address here is on 127.0.0.0/8.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from dicomfleet import credentials, render
from dicomfleet.inventory import Site

log = logging.getLogger(__name__)

ORTHANC_BINARY = "/usr/sbin/Orthanc"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on HOST right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def write_local_inventory(folder: Path, machines: list[dict], central: dict | None = None,
                          site_vars: dict | None = None) -> Path:
    """Write an inventory whose central host runs on 127.0.0.1 with free ports.

    MACHINES are dicts of ``dicomfleet_`` host variables, each with
    ``name`` for the inventory host name. Returns the inventory's path.
    """
    storage = folder / "orthanc-storage"
    central_vars = {
        "ansible_host": "127.0.0.1",
        "dicomfleet_orthanc_name": "local",
        "dicomfleet_orthanc_aet": "ORTHANC",
        "dicomfleet_orthanc_http_port": free_port(),
        "dicomfleet_orthanc_dicom_port": free_port(),
        "dicomfleet_orthanc_storage_directory": str(storage),
        "dicomfleet_orthanc_plugins": [],
        "dicomfleet_orthanc_stable_age": 2,
        "dicomfleet_mongodb_uri": "",
        # A local run has no nginx in front of Orthanc, so agents send plain HTTP on loopback.
        "dicomfleet_tls": False,
        # Several local syncs may run at once; their metrics are asked for explicitly.
        "dicomfleet_sync_metrics_port": 0,
    }
    central_vars.update(central or {})

    hosts = {}
    for machine in machines:
        machine = dict(machine)
        hosts[machine.pop("name")] = machine

    document = {
        "all": {
            "vars": {"dicomfleet_site": "local", **(site_vars or {})},
            "children": {
                "central": {"hosts": {"central": central_vars}},
                "scanners": {"hosts": hosts},
            },
        }
    }
    path = folder / "inventory.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def terminate(process: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """Stop PROCESS with SIGTERM, then SIGKILL after TIMEOUT seconds, and reap it."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class OrthancProcess:
    """A real Orthanc started from the configuration the project renders for SITE's central host."""

    def __init__(self, site: Site, folder: Path, secrets_dir: Path | None = None):
        self.site = site
        self.server = next(iter(site.servers.values()))
        self.folder = folder
        self.secrets = credentials.ensure_secrets(site, secrets_dir or folder / "secrets")
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.server.http_port}"

    @property
    def admin_auth(self) -> tuple[str, str]:
        """The administrator's user name and password."""
        return (credentials.ADMIN_USER, self.secrets.orthanc_password(credentials.ADMIN_USER))

    def auth_of(self, username: str) -> tuple[str, str]:
        """The user name and password of the Orthanc user USERNAME."""
        return (username, self.secrets.orthanc_password(username))

    def write_config(self) -> Path:
        """Render orthanc.json and credentials.json into this Orthanc's config folder."""
        config = self.folder / "orthanc-config"
        config.mkdir(parents=True, exist_ok=True)
        context = render.server_context(self.site, self.server, self.secrets)
        (config / "orthanc.json").write_text(render.render_template("orthanc.json.j2", context))
        (config / "credentials.json").write_text(
            render.render_template("orthanc-credentials.json.j2", context))
        return config

    def start(self, timeout: float = 90.0) -> "OrthancProcess":
        """Start Orthanc and wait until its REST API answers."""
        config = self.write_config()
        logs = self.folder / "orthanc-logs"
        logs.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            [ORTHANC_BINARY, f"--logdir={logs}", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with status {self.process.returncode}; see {logs}")
            try:
                answer = requests.get(self.url + "/system", auth=self.admin_auth, timeout=1)
                if answer.status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {timeout} s; see {logs}")

    def stop(self) -> None:
        """Stop Orthanc and wait for it to exit."""
        terminate(self.process)
        self.process = None

    def get(self, path: str, **kwargs):
        """GET PATH from the REST API as the administrator and return the decoded JSON."""
        answer = requests.get(self.url + path, auth=self.admin_auth, timeout=10, **kwargs)
        answer.raise_for_status()
        return answer.json()


class SecantusProcess:
    """A SecantusDB server on a loopback port, storing into FOLDER."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.uri = f"mongodb://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 90.0) -> "SecantusProcess":
        """Start the server and wait until it accepts connections."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(self.port),
             "--storage-path", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SecantusDB exited with status {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"SecantusDB did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        terminate(self.process)
        self.process = None


def write_agent_config(site: Site, host: str, folder: Path, secrets: credentials.SiteSecrets,
                       metrics_port: int = 0) -> Path:
    """Render HOST's agent.toml for a local run: state under FOLDER, passwords from files.

    The deployed agent reads its passwords from systemd credentials; a local
    run points each machine's ``password_file`` at the secret instead. The
    metrics endpoint is off unless METRICS_PORT is given, because local runs
    start many agents on one machine and the inventory's port would collide.
    """
    machines = [m for m in site.machines.values() if m.agent_host == host]
    context = render.agent_context(site, host, machines)
    context["metrics_port_override"] = metrics_port
    text = render.render_template("agent.toml.j2", context)
    text = text.replace("/var/lib/dicomfleet-agent", str(folder / "agent-state"))

    lines = []
    for line in text.splitlines():
        lines.append(line)
        if line.startswith("credential = "):
            name = json.loads(line.split("=", 1)[1].strip())
            username = name.removeprefix("orthanc-")
            secret_file = folder / "agent-secrets" / name
            secret_file.parent.mkdir(parents=True, exist_ok=True)
            secret_file.write_text(secrets.orthanc_password(username) + "\n")
            secret_file.chmod(0o600)
            lines.append(f"password_file = {json.dumps(str(secret_file))}")
    path = folder / f"agent-{host}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
