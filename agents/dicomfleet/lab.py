"""Boot and stop the local lab: systemd-nspawn containers that stand in for a site's hosts.

Each deployed host of an inventory boots Debian bookworm with systemd, and its
sshd listens on the host's own loopback address in 127.0.10.0/24. The hosts
share one base image, built once with debootstrap and cached under
``/var/cache/dicomfleet`` (env ``DICOMFLEET_LAB_CACHE``). Each host writes into
its own overlay upper folder under ``/var/lib/dicomfleet-lab/SITE/HOST/``
(env ``DICOMFLEET_LAB_STATE`` moves that root), where a state file records the
PID of its ``systemd-nspawn`` process. Only recorded PIDs are ever signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from dicomfleet import render
from dicomfleet.inventory import InventoryError, Site, load_site

log = logging.getLogger(__name__)

LAB_NETWORK = ipaddress.ip_network("127.0.10.0/24")

DEFAULT_CACHE = Path("/var/cache/dicomfleet")
DEFAULT_STATE_ROOT = Path("/var/lib/dicomfleet-lab")

SUITE = "bookworm"
BASE_PACKAGES = (
    "python3", "openssh-server", "iproute2", "procps", "systemd", "systemd-sysv", "dbus",
    "ca-certificates",
)
# Debian packages that provide the tools the lab runs on the control machine.
TOOL_PACKAGES = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
}

APT_SOURCES_LIST = Path("/etc/apt/sources.list")
APT_SOURCES_PARTS = Path("/etc/apt/sources.list.d")

BOOT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
SSH_PORT = 22

_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class LabError(Exception):
    """Raised when a lab host cannot be booted, reached or stopped."""


class SSHCommandError(subprocess.CalledProcessError):
    """Raised by ``ssh`` when a command on a lab host exits with a non-zero status."""

    def __init__(self, address: str, returncode: int, cmd: list[str], output: str, stderr: str):
        super().__init__(returncode, cmd, output, stderr)
        self.address = address

    def __str__(self) -> str:
        remote = self.cmd[-1]
        detail = (self.stderr or "").strip() or (self.output or "").strip()[-500:] or "no output"
        return (f"Command {remote!r} on lab host {self.address} exited with status "
                f"{self.returncode}: {detail}")


def cache_dir() -> Path:
    """Return the folder of the base image, the lab key and the known_hosts file."""
    return Path(os.environ.get("DICOMFLEET_LAB_CACHE") or DEFAULT_CACHE)


def state_root() -> Path:
    """Return the folder holding one subfolder per site and host of the lab."""
    return Path(os.environ.get("DICOMFLEET_LAB_STATE") or DEFAULT_STATE_ROOT)


def base_dir() -> Path:
    """Return the folder of the base image that every lab host boots."""
    return cache_dir() / "lab-base"


def key_path() -> Path:
    """Return the path of the lab's ed25519 SSH private key. The public key is beside it with ``.pub``."""
    return cache_dir() / "lab-key"


def known_hosts_path() -> Path:
    """Return the path of the known_hosts file listing every lab address with the base image's host key."""
    return cache_dir() / "lab-known_hosts"


@dataclasses.dataclass(frozen=True)
class LabHost:
    """One inventory host as a lab container."""

    site: str
    host: str
    address: str

    @property
    def machine(self) -> str:
        """The container's machine name, unique across labs: SITE-HOST."""
        return f"{self.site}-{self.host}".replace("_", "-").replace(".", "-")

    @property
    def folder(self) -> Path:
        """The host's folder: overlay upper folder, boot log and state file."""
        return state_root() / self.site / self.host

    @property
    def upper(self) -> Path:
        """The overlay upper folder holding every file the host wrote."""
        return self.folder / "upper"

    @property
    def log_path(self) -> Path:
        """The output of the host's systemd-nspawn process, console included."""
        return self.folder / "nspawn.log"

    @property
    def state_path(self) -> Path:
        """The state file of a started host, which exists only while the host runs."""
        return self.folder / "state.json"

    def describe(self) -> str:
        """Return a phrase naming the host, its site and its address for messages."""
        return f"lab host {self.host} of site {self.site} ({self.address})"


@dataclasses.dataclass(frozen=True)
class HostState:
    """The record of a started host in its state file."""

    host: LabHost
    pid: int
    inventory: str
    started_at: float

    def to_json(self) -> str:
        """Return the state file's content."""
        return json.dumps({
            "site": self.host.site,
            "host": self.host.host,
            "address": self.host.address,
            "machine": self.host.machine,
            "pid": self.pid,
            "inventory": self.inventory,
            "started_at": self.started_at,
        }, indent=2) + "\n"


# Inventory checks ------------------------------------------------------------


def lab_hosts(site: Site) -> list[LabHost]:
    """Return SITE's deployed hosts as lab hosts, in deploy order.

    Raises LabError naming the inventory, host and address when an address is
    not an IP address in 127.0.10.0/24, when two hosts share an address or a
    machine name, or when a host name cannot name a folder and a container.
    """
    hosts = []
    problems = []
    seen_addresses: dict[str, str] = {}
    seen_machines: dict[str, str] = {}

    for name in render.deployed_hosts(site):
        address = str(site.hosts[name].vars.get("ansible_host", name))
        where = f"{site.path}: host {name}: ansible_host"

        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            problems.append(f"{where}: {address!r} is not an IP address; lab hosts need an "
                            f"address in {LAB_NETWORK}.")
            continue
        if parsed not in LAB_NETWORK:
            problems.append(f"{where}: {address} is outside {LAB_NETWORK}; lab hosts live on "
                            f"{LAB_NETWORK} only, so give the host an address such as 127.0.10.20.")
            continue

        if not _HOST_NAME.match(name):
            problems.append(f"{site.path}: host {name!r}: the lab needs a host name of letters, "
                            "digits, '.', '-' or '_' (up to 63), because it names a folder and a container.")
            continue

        host = LabHost(site=site.name, host=name, address=str(parsed))
        if host.address in seen_addresses:
            problems.append(f"{where}: {host.address} is also the address of host "
                            f"{seen_addresses[host.address]}; every lab host needs its own address.")
        seen_addresses.setdefault(host.address, name)
        if len(host.machine) > 64:
            problems.append(f"{site.path}: host {name}: the machine name {host.machine!r} is "
                            "longer than 64 characters; shorten the site or host name.")
        if host.machine in seen_machines:
            problems.append(f"{site.path}: host {name}: the machine name {host.machine!r} is also "
                            f"that of host {seen_machines[host.machine]}; rename one of them.")
        seen_machines.setdefault(host.machine, name)
        hosts.append(host)

    if problems:
        raise LabError("\n".join(problems))
    return hosts


def _check_lab_address(address: str) -> str:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise LabError(f"The lab host address {address!r} is not an IP address; lab hosts live on "
                       f"{LAB_NETWORK}.") from None
    if parsed not in LAB_NETWORK:
        raise LabError(f"The address {address} is outside {LAB_NETWORK}; the lab only contacts hosts there.")
    return str(parsed)


# Control machine tools, key and base image -----------------------------------


INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
MIN_INOTIFY_INSTANCES = 1024


def ensure_inotify_instances() -> None:
    """Raise the kernel's inotify instance limit to MIN_INOTIFY_INSTANCES if it is lower.

    Every container's systemd and every local agent take inotify instances from
    root's share (128 by default); when it runs out, a booting container fails
    with "Too many open files".
    """
    try:
        current = int(INOTIFY_INSTANCES.read_text())
        if current < MIN_INOTIFY_INSTANCES:
            INOTIFY_INSTANCES.write_text(f"{MIN_INOTIFY_INSTANCES}\n")
            log.info("Raised fs.inotify.max_user_instances from %d to %d", current, MIN_INOTIFY_INSTANCES)
    except OSError as error:
        log.warning("Could not raise fs.inotify.max_user_instances: %s", error)


def ensure_tools() -> None:
    """Install systemd-container, debootstrap and openssh-client with apt-get if a tool is missing."""
    ensure_inotify_instances()
    missing = sorted({package for tool, package in TOOL_PACKAGES.items() if shutil.which(tool) is None})
    if not missing:
        return

    log.info("Installing the lab's tools with apt-get: %s", ", ".join(missing))
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", *missing]):
        result = subprocess.run(command, env=environment, capture_output=True, text=True)
        if result.returncode != 0:
            raise LabError(f"'{shlex.join(command)}' failed with status {result.returncode}: "
                           f"{result.stderr.strip()[-2000:]}; install {', '.join(missing)} by hand.")


def ensure_key() -> Path:
    """Generate the lab's ed25519 key pair unless it exists, and return the private key's path."""
    private = key_path()
    if private.exists() and private.with_name(private.name + ".pub").exists():
        return private

    private.parent.mkdir(parents=True, exist_ok=True)
    private.unlink(missing_ok=True)
    private.with_name(private.name + ".pub").unlink(missing_ok=True)
    result = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dicomfleet-lab", "-f", str(private)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise LabError(f"ssh-keygen failed to create the lab key {private}: {result.stderr.strip()}")
    log.info("Generated the lab SSH key %s", private)
    return private


def public_key() -> str:
    """Return the lab's public key line."""
    return key_path().with_name(key_path().name + ".pub").read_text(encoding="ascii").strip()


def _source_files() -> list[Path]:
    files = []
    if APT_SOURCES_LIST.is_file():
        files.append(APT_SOURCES_LIST)
    if APT_SOURCES_PARTS.is_dir():
        for path in sorted(APT_SOURCES_PARTS.iterdir()):
            if path.suffix in (".list", ".sources") and path.is_file():
                files.append(path)
    return files


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
            continue
        if line[0] in " \t" and key:
            stanza[key] += " " + line.strip()
            continue
        key, _, value = line.partition(":")
        key = key.strip().lower()
        stanza[key] = value.strip()
    if stanza:
        yield stanza


def _one_line_sources(text: str) -> Iterator[tuple[str, list[str]]]:
    """Yield (URI, [suite]) for each ``deb`` line of a sources.list file."""
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields or fields[0] != "deb":
            continue
        fields = fields[1:]
        if fields and fields[0].startswith("["):
            while fields and not fields[0].endswith("]"):
                fields = fields[1:]
            fields = fields[1:]
        if len(fields) >= 2:
            yield fields[0], [fields[1]]


def apt_mirror() -> str:
    """Return the URI of the Debian mirror that this machine's apt uses for bookworm.

    Reads /etc/apt/sources.list and the ``.list`` and ``.sources`` files of
    /etc/apt/sources.list.d, so the lab fetches from wherever the machine does.
    """
    for path in _source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".sources":
            for stanza in _deb822_stanzas(text):
                if stanza.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" not in stanza.get("types", "").split():
                    continue
                uris = stanza.get("uris", "").split()
                if uris and SUITE in stanza.get("suites", "").split():
                    return uris[0]
        else:
            for uri, suites in _one_line_sources(text):
                if SUITE in suites:
                    return uri

    searched = ", ".join(str(p) for p in _source_files()) or f"{APT_SOURCES_LIST} and {APT_SOURCES_PARTS}"
    raise LabError(f"No apt source for Debian {SUITE} was found in {searched}; add the Debian "
                   f"mirror this machine uses for {SUITE} so the lab can build its base image.")


def _keyrings_of(path: Path) -> list[Path]:
    """Return the keyring files that the Signed-By fields of the sources file PATH name."""
    found = re.findall(r"signed-by[:=]\s*([^\s\]]+)", path.read_text(encoding="utf-8", errors="replace"),
                       flags=re.IGNORECASE)
    return [Path(value) for value in found if value.startswith("/")]


def _copy_apt_sources(image: Path) -> None:
    """Replace the image's apt sources by this machine's, with the keyrings they name."""
    (image / "etc/apt/sources.list").unlink(missing_ok=True)
    for source in _source_files():
        target = image / source.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        for keyring in _keyrings_of(source):
            image_keyring = image / keyring.relative_to("/")
            if keyring.is_file() and not image_keyring.exists():
                image_keyring.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(keyring, image_keyring)


def _install_authorized_key(root: Path) -> None:
    ssh_folder = root / "root/.ssh"
    ssh_folder.mkdir(parents=True, exist_ok=True)
    os.chmod(ssh_folder, 0o700)
    authorized = ssh_folder / "authorized_keys"
    authorized.write_text(public_key() + "\n", encoding="ascii")
    os.chmod(authorized, 0o600)


def _unmount_below(folder: Path) -> None:
    """Unmount whatever an interrupted debootstrap left mounted inside FOLDER."""
    prefix = str(folder.resolve()) + "/"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        points = [line.split()[1] for line in mounts]
    points = [p.encode().decode("unicode_escape") for p in points]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        log.warning("Unmounting %s left by an interrupted base image build", point)
        result = subprocess.run(["umount", "--lazy", point], capture_output=True, text=True)
        if result.returncode != 0:
            raise LabError(f"Cannot unmount {point} inside the unfinished base image {folder}: "
                           f"{result.stderr.strip()}; unmount it by hand and run again.")


def ensure_base_image() -> Path:
    """Build the base image with debootstrap unless it exists, and return its folder.

    The build runs in ``lab-base.partial`` and is renamed to ``lab-base`` only
    once complete, so an interrupted build is never taken for the cache.
    """
    base = base_dir()
    if base.is_dir():
        _refresh_authorized_key(base)
        return base

    partial = base.with_name(base.name + ".partial")
    if partial.exists():
        log.info("Removing the unfinished base image %s", partial)
        _unmount_below(partial)
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)

    mirror = apt_mirror()
    build_log = base.with_name(base.name + "-build.log")
    command = ["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
               SUITE, str(partial), mirror]
    log.info("Building the lab base image %s from %s; this takes a minute or two, once per cache", base, mirror)
    started = time.monotonic()
    with open(build_log, "w", encoding="utf-8") as output:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise LabError(f"debootstrap failed with status {result.returncode} building {partial} from "
                       f"{mirror}; see {build_log}.")

    _install_authorized_key(partial)
    _copy_apt_sources(partial)
    (partial / "etc/hostname").write_text("lab-base\n", encoding="ascii")
    partial.rename(base)
    log.info("Built the lab base image %s in %.0f s", base, time.monotonic() - started)
    return base


def _refresh_authorized_key(base: Path) -> None:
    """Install the current lab key in BASE when the key was generated after the image."""
    authorized = base / "root/.ssh/authorized_keys"
    try:
        current = authorized.read_text(encoding="ascii")
    except FileNotFoundError:
        current = ""
    if public_key() not in current:
        log.warning("The base image %s does not trust the current lab key; installing it", base)
        _install_authorized_key(base)


def write_known_hosts(base: Path) -> Path:
    """Write the known_hosts file: every address of 127.0.10.0/24 with the base image's host key.

    All lab hosts boot the same image and so present the same host key, which
    lets clients check host keys strictly. The file is replaced atomically and
    only when its content changes, so readers never see it half-written.
    """
    key_file = base / "etc/ssh/ssh_host_ed25519_key.pub"
    try:
        key_type, key_data = key_file.read_text(encoding="ascii").split()[:2]
    except (FileNotFoundError, ValueError) as error:
        raise LabError(f"The base image has no usable SSH host key {key_file} ({error}); "
                       f"delete {base} so the next 'dicomfleet lab up' rebuilds it.") from error

    lines = [f"{address} {key_type} {key_data}\n" for address in LAB_NETWORK]
    content = "".join(lines)
    target = known_hosts_path()
    if target.exists() and target.read_text(encoding="ascii") == content:
        return target

    temporary = target.with_name(target.name + f".tmp-{os.getpid()}")
    temporary.write_text(content, encoding="ascii")
    os.chmod(temporary, 0o644)
    temporary.replace(target)
    log.info("Wrote %s for %d lab addresses", target, len(lines))
    return target


# SSH ---------------------------------------------------------------------------


def ssh_options() -> list[str]:
    """Return the ssh(1) options that reach lab hosts as root with the lab key and strict host keys."""
    return [
        "-i", str(key_path()),
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts_path()}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=5",
        "-o", "LogLevel=ERROR",
    ]


def ssh(address: str, command: str | Sequence[str], check: bool = True,
        timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run COMMAND as root on the lab host at ADDRESS and return the finished process.

    COMMAND is a shell command line, or a list of arguments that is quoted
    into one. Output is captured as text. With CHECK, a non-zero exit status
    raises SSHCommandError, a subprocess.CalledProcessError. ssh itself exits
    with 255 when it cannot connect. After TIMEOUT seconds,
    subprocess.TimeoutExpired is raised.
    """
    address = _check_lab_address(address)
    remote = command if isinstance(command, str) else shlex.join(command)
    argv = ["ssh", *ssh_options(), f"root@{address}", remote]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise SSHCommandError(address, result.returncode, argv, result.stdout, result.stderr)
    return result


def accepts_ssh(address: str) -> bool:
    """Return True when something accepts TCP connections on ADDRESS's SSH port."""
    address = _check_lab_address(address)
    try:
        with socket.create_connection((address, SSH_PORT), timeout=1.0):
            return True
    except OSError:
        return False


# Host processes ----------------------------------------------------------------


def _nspawn_alive(pid: int, machine: str) -> bool:
    """Return True when PID is a live systemd-nspawn process started with ``-M MACHINE``.

    A live process whose command line does not match is read twice more,
    50 ms apart, before this returns False, because a false negative makes the
    lab delete the state file of a running host.
    """
    for attempt in range(3):
        if attempt:
            time.sleep(0.05)
        try:
            process_status = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            return False

        # The state is the field after the parenthesised command name; Z is a zombie.
        if process_status.rpartition(")")[2].split()[0] == "Z":
            return False
        if _is_nspawn_of(arguments, machine):
            return True
    return False


def _is_nspawn_of(arguments: list[bytes], machine: str) -> bool:
    """Return True when the command line ARGUMENTS runs systemd-nspawn with ``-M MACHINE``."""
    names = [a.decode("utf-8", errors="replace") for a in arguments]
    if not names or os.path.basename(names[0]) != "systemd-nspawn":
        return False
    return any(names[i] == "-M" and names[i + 1] == machine for i in range(len(names) - 1))


def _reap(pid: int) -> None:
    """Collect PID's exit status when it is a child of this process, so it leaves no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _read_state(path: Path) -> HostState | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        host = LabHost(site=data["site"], host=data["host"], address=data["address"])
        return HostState(host=host, pid=int(data["pid"]), inventory=str(data.get("inventory", "")),
                         started_at=float(data.get("started_at", 0.0)))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:
        log.warning("Ignoring the unreadable lab state file %s: %s", path, error)
        return None


def _write_state(state: HostState) -> None:
    temporary = state.host.state_path.with_suffix(".tmp")
    temporary.write_text(state.to_json(), encoding="utf-8")
    temporary.replace(state.host.state_path)


def running_state(host: LabHost) -> HostState | None:
    """Return HOST's state when its recorded systemd-nspawn process still runs.

    A state file whose process is gone is stale, and is removed.
    """
    state = _read_state(host.state_path)
    if state is None:
        return None
    if _nspawn_alive(state.pid, state.host.machine):
        return state

    log.info("Removing the stale state of %s: process %d is gone", host.describe(), state.pid)
    host.state_path.unlink(missing_ok=True)
    return None


def _recorded_hosts(site_name: str | None = None) -> list[LabHost]:
    """Return every host with a folder under the state root, or only SITE_NAME's."""
    root = state_root()
    if not root.is_dir():
        return []
    sites = [root / site_name] if site_name else sorted(p for p in root.iterdir() if p.is_dir())
    hosts = []
    for site_folder in sites:
        if not site_folder.is_dir():
            continue
        for folder in sorted(p for p in site_folder.iterdir() if p.is_dir()):
            state = _read_state(folder / "state.json")
            address = state.host.address if state else _listen_address(folder / "upper")
            hosts.append(LabHost(site=site_folder.name, host=folder.name, address=address))
    return hosts


def running_hosts() -> list[HostState]:
    """Return the state of every lab host that runs now, across all sites."""
    states = []
    for host in _recorded_hosts():
        state = running_state(host)
        if state is not None:
            states.append(state)
    return states


@contextlib.contextmanager
def _lab_lock() -> Iterator[None]:
    """Hold the lab's lock, so two commands never boot or stop hosts at once."""
    root = state_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w", encoding="ascii") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _listen_address(upper: Path) -> str:
    """Return the address a stopped host's sshd was set to listen on, or "" when unknown."""
    try:
        text = (upper / "etc/ssh/sshd_config.d/listen.conf").read_text(encoding="ascii")
    except FileNotFoundError:
        return ""
    return text.split()[-1] if text.split() else ""


def _prepare_upper(host: LabHost, base: Path) -> None:
    """Write the host's own files into its upper folder: hostname, machine id and sshd address.

    overlayfs shows a folder present in both layers with the upper folder's
    mode, so each folder created here takes the mode of its twin in BASE.
    """
    for relative in ("", "etc", "etc/ssh", "etc/ssh/sshd_config.d"):
        folder = host.upper / relative
        folder.mkdir(exist_ok=True)
        os.chmod(folder, stat.S_IMODE((base / relative).stat().st_mode))

    etc = host.upper / "etc"
    _write_file(etc / "hostname", host.host.replace("_", "-") + "\n")
    _write_file(etc / "ssh/sshd_config.d/listen.conf", f"ListenAddress {host.address}\n")

    machine_id = etc / "machine-id"
    if not machine_id.exists():
        _write_file(machine_id, uuid.uuid4().hex + "\n")


def _write_file(path: Path, content: str) -> None:
    """Write CONTENT to PATH with mode 0644, whatever the umask."""
    path.write_text(content, encoding="ascii")
    os.chmod(path, 0o644)


def _start(host: LabHost, base: Path, inventory: str) -> tuple[HostState, subprocess.Popen]:
    """Start HOST's container in the background, record its PID and return its state and process."""
    _prepare_upper(host, base)
    command = [
        "systemd-nspawn", "-D", str(base), f"--overlay={base}:{host.upper}:/",
        "--register=no", "--keep-unit", "-M", host.machine, "--console=passive", "-b",
    ]
    with open(host.log_path, "a", encoding="utf-8") as output:
        output.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        output.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)

    state = HostState(host=host, pid=process.pid, inventory=inventory, started_at=time.time())
    _write_state(state)
    log.info("Started %s as machine %s, process %d", host.describe(), host.machine, process.pid)
    return state, process


def _wait_until_booted(state: HostState, process: subprocess.Popen, deadline: float, timeout: float) -> str:
    """Wait until the host's systemd reports running or degraded over SSH, and return that word."""
    host = state.host
    attempts = 0
    answer = ""
    while True:
        if process.poll() is not None:
            host.state_path.unlink(missing_ok=True)
            raise LabError(f"The container of {host.describe()} exited with status {process.returncode} "
                           f"while booting; see {host.log_path}.")

        attempts += 1
        try:
            result = ssh(host.address, "systemctl is-system-running", check=False, timeout=15)
            answer = result.stdout.strip() or result.stderr.strip()
        except subprocess.TimeoutExpired:
            answer = "ssh timed out"
        if answer in ("running", "degraded"):
            log.info("%s is up (%s) after %.1f s and %d SSH attempts", host.describe(), answer,
                     time.time() - state.started_at, attempts)
            return answer

        if time.monotonic() > deadline:
            _stop(state)
            raise LabError(f"The {host.describe()} did not reach 'running' over SSH within "
                           f"{timeout:g} s (last answer: {answer or 'none'}); it was stopped. "
                           f"See its console log {host.log_path}.")
        time.sleep(0.5)


def _stop(state: HostState) -> None:
    """Stop the recorded systemd-nspawn process: SIGTERM, then SIGKILL after 20 s.

    systemd-nspawn turns SIGTERM into a clean shutdown of the container. A
    container still starting may drop that request before its systemd handles
    signals, so SIGTERM is sent again every 2 s until the 20 s are up.
    """
    host = state.host
    if not _nspawn_alive(state.pid, host.machine):
        _reap(state.pid)
        host.state_path.unlink(missing_ok=True)
        log.info("%s was already stopped", host.describe())
        return

    log.info("Stopping %s, process %d", host.describe(), state.pid)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    stopped = False
    while not stopped and time.monotonic() < deadline:
        if _nspawn_alive(state.pid, host.machine):
            os.kill(state.pid, signal.SIGTERM)
        stopped = _wait_for_exit(state, min(2.0, max(0.0, deadline - time.monotonic())))

    if not stopped:
        _kill(state)

    host.state_path.unlink(missing_ok=True)
    log.info("Stopped %s", host.describe())


def _kill(state: HostState) -> None:
    """SIGKILL the container's init and then the systemd-nspawn process of STATE.

    Killing systemd-nspawn alone would leave the container running without it,
    so its init, whose death ends every process of the container, goes first.
    """
    host = state.host
    inits = _container_inits(state.pid)
    log.warning("%s did not stop within %.0f s of SIGTERM; sending SIGKILL to its init %s",
                host.describe(), STOP_TIMEOUT_S, inits or "(not found)")
    for init in inits:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signal.SIGKILL)

    if _wait_for_exit(state, 5.0):
        return
    if _nspawn_alive(state.pid, host.machine):
        log.warning("Sending SIGKILL to systemd-nspawn process %d of %s", state.pid, host.describe())
        os.kill(state.pid, signal.SIGKILL)
    if not _wait_for_exit(state, 10.0):
        raise LabError(f"Process {state.pid} of {host.describe()} survived SIGKILL; "
                       f"its state file {host.state_path} is kept.")


def _container_inits(pid: int) -> list[int]:
    """Return the children of the systemd-nspawn process PID that run in another PID namespace."""
    own_namespace = os.readlink("/proc/self/ns/pid")
    inits = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in children.read_text(encoding="ascii").split():
                if os.readlink(f"/proc/{child}/ns/pid") != own_namespace:
                    inits.append(int(child))
    return inits


def _wait_for_exit(state: HostState, timeout: float) -> bool:
    """Wait up to TIMEOUT seconds for the recorded process to end; return True when it did."""
    deadline = time.monotonic() + timeout
    while True:
        _reap(state.pid)
        if not _nspawn_alive(state.pid, state.host.machine):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _wipe_upper(host: LabHost) -> None:
    """Delete every file HOST wrote, leaving only its boot log."""
    if not host.upper.exists():
        return
    shutil.rmtree(host.upper)
    log.info("Wiped the upper folder of %s", host.describe())


# Public API --------------------------------------------------------------------


def up(site: Site, fresh: bool = False, boot_timeout: float = BOOT_TIMEOUT_S) -> dict[str, str]:
    """Boot every deployed host of SITE that is not running, and return {host: address}.

    A running host is left alone, unless FRESH, which stops it and wipes its
    upper folder first. Addresses are checked before anything starts.
    """
    hosts = lab_hosts(site)
    ensure_tools()

    with _lab_lock():
        _check_conflicts(hosts, running_hosts(), fresh)
        ensure_key()
        base = ensure_base_image()
        write_known_hosts(base)

        stopped_hosts = []
        for host in hosts:
            state = running_state(host)
            if state is not None and fresh:
                _stop(state)
                state = None
            if fresh:
                _wipe_upper(host)

            if state is None:
                stopped_hosts.append(host)
            else:
                log.info("%s already runs as process %d; leaving it alone", host.describe(), state.pid)

        for host in stopped_hosts:
            if accepts_ssh(host.address):
                raise LabError(f"Something that is not a recorded lab host already accepts SSH "
                               f"connections on {host.address}, the address of {host.describe()}. "
                               "Stop it or give the host another address.")

        booting = []
        for host in stopped_hosts:
            host.folder.mkdir(parents=True, exist_ok=True)
            booting.append(_start(host, base, str(site.path.resolve())))

        deadline = time.monotonic() + boot_timeout
        for state, process in booting:
            _wait_until_booted(state, process, deadline, boot_timeout)

    return {host.host: host.address for host in hosts}


def _check_conflicts(hosts: list[LabHost], running: list[HostState], fresh: bool) -> None:
    """Raise LabError when a running lab host uses one of HOSTS' addresses or machine names.

    A running host of the same name on another address conflicts too, unless
    FRESH restarts it.
    """
    problems = []
    for host in hosts:
        for state in running:
            other = state.host
            if (other.site, other.host) == (host.site, host.host):
                if other.address != host.address and not fresh:
                    problems.append(f"Lab host {host.host} of site {host.site} runs on {other.address}, "
                                    f"but the inventory now gives {host.address}; run 'dicomfleet lab up "
                                    "--fresh' to restart it on the new address.")
                continue
            if other.address == host.address:
                problems.append(f"Lab host {host.host} of site {host.site} cannot use {host.address}: "
                                f"the running lab host {other.host} of site {other.site} (inventory "
                                f"{state.inventory or 'unknown'}) listens there. Stop it with "
                                f"'dicomfleet lab down {state.inventory or 'INVENTORY'}' or choose another address.")
            elif other.machine == host.machine:
                problems.append(f"Lab host {host.host} of site {host.site} cannot use the machine name "
                                f"{host.machine}: the running lab host {other.host} of site {other.site} "
                                "has it. Rename the site or the host.")
    if problems:
        raise LabError("\n".join(problems))


def down(site: Site | None = None) -> list[str]:
    """Stop SITE's running lab hosts, or every lab host this tool started when SITE is None.

    Returns the names of the hosts stopped as SITE/HOST. Stale state files are
    removed on the way.
    """
    stopped = []
    with _lab_lock():
        for host in _recorded_hosts(site.name if site else None):
            state = running_state(host)
            if state is None:
                continue
            _stop(state)
            stopped.append(f"{host.site}/{host.host}")

    if not stopped:
        log.info("No lab host of %s was running", f"site {site.name}" if site else "any site")
    return stopped


@dataclasses.dataclass(frozen=True)
class HostStatus:
    """One row of ``dicomfleet lab status``."""

    site: str
    host: str
    address: str
    running: bool
    pid: int | None


def status(site: Site | None = None) -> list[HostStatus]:
    """Return the state of SITE's deployed hosts, or of every host the lab has a folder for."""
    if site is not None:
        hosts = lab_hosts(site)
    else:
        hosts = _recorded_hosts()

    rows = []
    for host in hosts:
        state = running_state(host)
        rows.append(HostStatus(site=host.site, host=host.host, address=host.address or "-",
                               running=state is not None, pid=state.pid if state else None))
    return rows


# Command line ------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet lab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    up_parser = commands.add_parser("up", help="boot the inventory's hosts that are not running")
    up_parser.add_argument("inventory", help="inventory YAML file")
    up_parser.add_argument("--fresh", action="store_true",
                           help="stop each host and delete every file it wrote before booting it")

    down_parser = commands.add_parser("down", help="stop the inventory's hosts, or every lab host")
    down_parser.add_argument("inventory", nargs="?", help="inventory YAML file (default: every lab host)")

    status_parser = commands.add_parser("status", help="print each host's address, state and PID")
    status_parser.add_argument("inventory", nargs="?", help="inventory YAML file (default: every lab host)")
    return parser


def _print_status(rows: list[HostStatus]) -> None:
    print(f"{'SITE':<16} {'HOST':<16} {'ADDRESS':<15} {'STATE':<8} PID")
    for row in rows:
        state = "running" if row.running else "stopped"
        pid = str(row.pid) if row.pid is not None else "-"
        print(f"{row.site:<16} {row.host:<16} {row.address:<15} {state:<8} {pid}")


def main(args: list[str] | None = None) -> int:
    """Run ``dicomfleet lab up|down|status``."""
    options = _build_parser().parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        site = load_site(options.inventory) if options.inventory else None
        if options.command == "up":
            addresses = up(site, fresh=options.fresh)
            for host, address in addresses.items():
                print(f"{host} {address}")
        elif options.command == "down":
            down(site)
        else:
            _print_status(status(site))
    except InventoryError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 1
    except LabError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
