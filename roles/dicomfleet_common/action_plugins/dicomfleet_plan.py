"""Ansible action that returns a host's dicomfleet plan, computed on the controller.

It validates the inventory sources with dicomfleet.inventory.load_site, reads the
site's secrets (decrypting ansible-vault files) and splits render.plan_host by role.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import fnmatch
import hashlib
import posixpath
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from ansible import constants
from ansible.errors import AnsibleError
from ansible.parsing.vault import is_encrypted
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

display = Display()

# roles/dicomfleet_common/action_plugins/ is three levels below the checkout.
PROJECT_ROOT = Path(__file__).resolve().parents[3]

try:
    import dicomfleet  # noqa: F401
except ImportError:
    # An Ansible outside the project's .venv still finds the package's source.
    sys.path.insert(0, str(PROJECT_ROOT / "agents"))

try:
    from dicomfleet import credentials, lab, render, wheelhouse
    from dicomfleet.inventory import InventoryError, Site, load_site
except ImportError as error:
    raise AnsibleError(
        f"The dicomfleet package cannot be imported by Ansible's Python {sys.executable} ({error}); "
        f"run ansible-playbook from the project's virtual environment, {PROJECT_ROOT / '.venv/bin'}."
    ) from error

# The same closing line as `dicomfleet deploy` prints under an invalid inventory.
NOTHING_DEPLOYED = "Nothing was deployed: fix the inventory and run the deploy again."

# Subfolders of an inventory folder that Ansible reads as variables, not as inventories.
SKIPPED_FOLDERS = ("group_vars", "host_vars")


class PlanError(Exception):
    """Raised when a site's secrets or the wheelhouse cannot give a host its plan."""


@dataclasses.dataclass(frozen=True)
class Component:
    """The part of a plan that one component role deploys: a systemd unit, its users and its Debian packages."""

    name: str
    unit: str
    # System users the role creates.
    users: tuple[str, ...] = ()
    # fnmatch patterns of the Debian packages the role installs.
    packages: tuple[str, ...] = ()
    # Users that a Debian package creates, whose folders the role creates too.
    package_users: tuple[str, ...] = ()

    def owns(self, directory: render.ManagedDirectory) -> bool:
        """Return True when DIRECTORY belongs to one of the role's users."""
        users = self.users + self.package_users
        return directory.owner in users or directory.group in users


# One entry per component role, roles/dicomfleet_NAME. A component that gets
# its own role adds its line here, and its items leave dicomfleet_other.
COMPONENTS = (
    Component("orthanc", "orthanc.service", packages=("orthanc", "orthanc-*"), package_users=("orthanc",)),
    Component("mongodb", "dicomfleet-mongodb.service", users=(render.MONGODB_USER,)),
    Component("sync", "dicomfleet-sync.service", users=(render.SYNC_USER,)),
    Component("agent", "dicomfleet-agent.service", users=(render.AGENT_USER,)),
)

# Root-owned folders and the virtual environment go to dicomfleet_common, which
# runs first; whatever no component claims goes to dicomfleet_other, which runs last.
COMMON = "common"
OTHER = "other"


# Inventory sources ----------------------------------------------------------------


def _names_dicomfleet(path: Path) -> bool:
    """Return True when the file PATH mentions a dicomfleet_ variable."""
    try:
        return "dicomfleet_" in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _files_in_folder(folder: Path) -> Iterator[Path]:
    """Yield the files of the inventory folder FOLDER that Ansible reads, in name order."""
    ignored_extensions = tuple(constants.INVENTORY_IGNORE_EXTS or ())
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if path.name not in SKIPPED_FOLDERS:
                yield from _files_in_folder(path)
        elif path.is_file() and not path.name.endswith(ignored_extensions):
            yield path


def site_files(sources: list[str]) -> list[Path]:
    """Return the dicomfleet inventory files among Ansible's inventory SOURCES.

    A file given as a source is always one. In a folder given as a source, a
    file is one when it names a dicomfleet_ variable, so the inventories that
    other tools (molecule, for one) write beside it are left out. A source
    that is no path, such as a comma-separated host list, is skipped.
    """
    files = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in _files_in_folder(path) if _names_dicomfleet(p))
    return files


def load_sites(sources: list[str]) -> list[Site]:
    """Validate every dicomfleet inventory among SOURCES and return their sites.

    Raises InventoryError with every problem of every file, and with one more
    when two files list the same deployed host.
    """
    files = site_files(sources)
    if not files:
        raise InventoryError([f"No dicomfleet inventory was found among the inventory sources "
                              f"{', '.join(sources) or '(none)'}; pass one with -i, for example "
                              "-i inventory/lab.yml."])

    sites = []
    problems = []
    for path in files:
        try:
            sites.append(load_site(path))
        except InventoryError as error:
            problems.extend(error.problems)

    owners: dict[str, Path] = {}
    for site in sites:
        for host in render.deployed_hosts(site):
            if host in owners:
                problems.append(f"{site.path}: host {host} is also a deployed host of {owners[host]}; "
                                "give every host one inventory file.")
            owners.setdefault(host, site.path)

    if problems:
        raise InventoryError(problems)
    return sites


@contextlib.contextmanager
def site_lock(site: Site) -> Iterator[None]:
    """Hold an exclusive lock on SITE's inventory file.

    Ansible plans hosts in parallel worker processes, and a secret missing
    from the secrets folder must be generated by one of them only.
    """
    with open(site.path, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Secrets ----------------------------------------------------------------------------


class VaultSiteSecrets(credentials.SiteSecrets):
    """A site's secrets, where any secret file may be encrypted with ansible-vault.

    Encrypted files are decrypted with the vault secrets given to
    ansible-playbook; plain files are read, and missing ones generated, as
    dicomfleet.credentials does.
    """

    def __init__(self, folder: Path, create: bool, loader: Any):
        super().__init__(folder, create)
        self.loader = loader
        self.generated: list[str] = []

    def read_file(self, path: Path) -> str:
        """Return the secret in PATH, decrypting it when ansible-vault encrypted it."""
        if path.is_file() and _vault_encrypted(path):
            return self._decrypt(path)
        return super().read_file(path)

    def secret(self, name: str) -> str:
        """Return the secret NAME, noting it when this run generates it."""
        if self.create and not (self.folder / name).exists():
            self.generated.append(name)
        return super().secret(name)

    def _decrypt(self, path: Path) -> str:
        try:
            real_path = self.loader.get_real_file(str(path), decrypt=True)
        except AnsibleError as error:
            raise PlanError(f"The secret file {path} is encrypted with ansible-vault and could not be "
                            f"decrypted ({error.message}); give ansible-playbook its vault password "
                            "with --vault-password-file, --vault-id or --ask-vault-pass.") from None
        try:
            return Path(real_path).read_text(encoding="utf-8").strip()
        finally:
            self.loader.cleanup_tmp_file(real_path)


def _vault_encrypted(path: Path) -> bool:
    with open(path, "rb") as handle:
        return is_encrypted(handle.read(64))


def secrets_folder(site: Site, secrets_dir: str) -> Path:
    """Return the folder of SITE's secrets: SECRETS_DIR/SITE, or dicomfleet's default."""
    if secrets_dir:
        return Path(secrets_dir).expanduser() / site.name
    return credentials.default_secrets_dir(site)


# Plan ---------------------------------------------------------------------------------


# HostPlan fields that split_plan hands to the roles; any other field fails the
# plan, so a field that render.py gains is never dropped without notice.
KNOWN_PLAN_FIELDS = frozenset({
    "host", "address", "roles", "users", "directories", "files", "services", "apt_packages",
    "needs_venv", "removed_paths", "commands",
})
PART_KEYS = ("packages", "users", "directories", "files", "services", "removed_paths", "commands")

# The mode of a folder that pyinfra's files.put creates with `mkdir -p` for a
# missing parent folder, under the usual umask 022.
PARENT_MODE = "0755"


def _empty_component() -> dict[str, Any]:
    part: dict[str, Any] = {key: [] for key in PART_KEYS}
    part["present"] = False
    return part


def check_plan_fields(plan: render.HostPlan) -> None:
    """Raise PlanError when PLAN has a filled field that the roles do not deploy."""
    unknown = [field.name for field in dataclasses.fields(plan)
               if field.name not in KNOWN_PLAN_FIELDS and getattr(plan, field.name)]
    if unknown:
        raise PlanError(f"The plan of host {plan.host} has {', '.join(unknown)}, which the Ansible roles do "
                        f"not deploy yet; teach split_plan in {Path(__file__).name} and a role to deploy it.")


def _claimed_by(predicate) -> str | None:
    return next((component.name for component in COMPONENTS if predicate(component)), None)


def split_plan(plan: render.HostPlan) -> dict[str, dict[str, Any]]:
    """Return PLAN's packages, users, folders, files and services per role.

    A component role gets its unit, the files that restart only that unit,
    its users, the folders they own and its packages. Other folders owned by
    root go to dicomfleet_common. Everything else, removed paths and commands
    included, goes to dicomfleet_other, so an item that render.py gains reaches
    hosts before it has a role of its own.
    """
    parts = {component.name: _empty_component() for component in COMPONENTS}
    parts[COMMON] = _empty_component()
    parts[OTHER] = _empty_component()

    for package in plan.apt_packages:
        owner = _claimed_by(lambda c: any(fnmatch.fnmatchcase(package, p) for p in c.packages))
        parts[owner or OTHER]["packages"].append(package)

    for user in plan.users:
        owner = _claimed_by(lambda c: user in c.users)
        parts[owner or OTHER]["users"].append(user)

    for directory in plan.directories:
        owner = _claimed_by(lambda c: c.owns(directory))
        if owner is None:
            owner = COMMON if (directory.owner, directory.group) == ("root", "root") else OTHER
        parts[owner]["directories"].append(dataclasses.asdict(directory))

    for managed in plan.files:
        owner = None
        if len(managed.restarts) == 1:
            owner = _claimed_by(lambda c: c.unit == managed.restarts[0])
        entry = dataclasses.asdict(managed)
        entry["restarts"] = list(managed.restarts)
        parts[owner or OTHER]["files"].append(entry)

    for unit in plan.services:
        owner = _claimed_by(lambda c: c.unit == unit)
        parts[owner or OTHER]["services"].append(unit)

    # dicomfleet_other runs last, so it removes paths and runs commands after
    # every role has put its files in place, as pyinfra_deploy does.
    for removed in plan.removed_paths:
        parts[OTHER]["removed_paths"].append({"path": removed.path, "restarts": list(removed.restarts)})

    for command in plan.commands:
        parts[OTHER]["commands"].append({"name": command.name, "command": command.command,
                                         "after_changes": list(command.after_changes)})

    planned = {directory.path for directory in plan.directories}
    for part in parts.values():
        part["parents"] = parent_folders(part["files"], planned)
        part["present"] = any(part[key] for key in PART_KEYS)
    if parts[OTHER]["present"]:
        display.vv(f"dicomfleet: dicomfleet_other deploys on {plan.host}: services "
                   f"{', '.join(parts[OTHER]['services']) or 'none'}, "
                   f"{len(parts[OTHER]['files'])} files")
    return parts


def parent_folders(files: list[dict[str, Any]], planned: set[str]) -> list[dict[str, str]]:
    """Return the folders of FILES that are not among the PLANNED folders, shallowest first.

    pyinfra's files.put creates such a folder when it is missing. It gives the
    folder the owner and group of the first file put there, and so do the roles.
    """
    parents: dict[str, dict[str, str]] = {}
    for managed in files:
        folder = posixpath.dirname(managed["path"])
        if folder in planned or folder in parents or folder in ("", "/"):
            continue
        parents[folder] = {"path": folder, "owner": managed["owner"], "group": managed["group"],
                           "mode": PARENT_MODE}
    return [parents[folder] for folder in sorted(parents)]


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheelhouse_folder(path: str) -> Path:
    """Return the wheelhouse folder PATH, or the checkout's build/wheelhouse when empty."""
    if path:
        return Path(path).expanduser().resolve()
    return wheelhouse.default_wheelhouse()


def venv_plan(plan: render.HostPlan, source: Path) -> dict[str, Any]:
    """Return how the host's virtual environment is installed from the wheelhouse SOURCE.

    This follows pyinfra_deploy.install_venv: every file of the wheelhouse is
    copied, pip runs from its own wheel, and central hosts also get secantusdb.
    Each wheel carries its SHA-1 so the role copies only the files that differ.
    """
    if not plan.needs_venv:
        return {"needed": False}

    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else []
    pip_wheels = [p.name for p in files if p.name.startswith("pip-") and p.name.endswith(".whl")]
    project_wheels = [p.name for p in files if p.name.startswith("dicomfleet-") and p.name.endswith(".whl")]
    if not pip_wheels or not project_wheels:
        raise PlanError(f"The wheelhouse {source} has no pip wheel or no dicomfleet wheel; run the "
                        "playbook's first play (on localhost) or 'dicomfleet wheelhouse' to build it.")

    # NOTE: the same rule as pyinfra_deploy.install_venv; HostPlan does not carry it.
    packages = ["dicomfleet", "secantusdb"] if render.ROLE_CENTRAL in plan.roles else ["dicomfleet"]
    return {
        "needed": True,
        "path": render.VENV,
        "wheels_path": render.WHEELHOUSE,
        "source": str(source),
        "wheels": [{"name": p.name, "key": f"{p.name} {_sha1(p)}"} for p in files],
        "pip_wheel": pip_wheels[0],
        "project_wheels": project_wheels,
        "packages": packages,
    }


def host_plan(site: Site, host: str, secrets: credentials.SiteSecrets, wheels: Path) -> dict[str, Any]:
    """Return the plan of HOST as plain data for the roles."""
    plan = render.plan_host(site, host, secrets)
    check_plan_fields(plan)
    lab_host = bool(site.hosts[host].vars.get("dicomfleet_lab"))
    return {
        "host": plan.host,
        "site": site.name,
        "inventory": str(site.path),
        "roles": list(plan.roles),
        "deployed": host in render.deployed_hosts(site),
        "services": list(plan.services),
        "components": split_plan(plan),
        "venv": venv_plan(plan, wheels),
        "lab_known_hosts": str(lab.known_hosts_path()) if lab_host else "",
    }


def _wheelhouse_state(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


class ActionModule(ActionBase):
    """Return the dicomfleet plan of the current host, or prepare the controller for every site."""

    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False

    _ARGUMENT_SPEC = {
        "prepare": {"type": "bool", "default": False},
        "secrets_dir": {"type": "str", "default": ""},
        "wheelhouse": {"type": "str", "default": ""},
        "build_wheelhouse": {"type": "bool", "default": True},
    }

    def run(self, tmp=None, task_vars=None):
        """Run on the controller only; no module is sent to the host."""
        result = super().run(tmp, task_vars)
        task_vars = task_vars or {}
        result["changed"] = False

        _, arguments = self.validate_argument_spec(argument_spec=self._ARGUMENT_SPEC)
        sources = [str(source) for source in task_vars.get("ansible_inventory_sources") or []]

        try:
            sites = load_sites(sources)
            if arguments["prepare"]:
                result.update(self._prepare(sites, arguments))
            else:
                host = str(task_vars.get("inventory_hostname"))
                result["plan"] = self._plan(sites, host, arguments)
        except InventoryError as error:
            result.update(failed=True, msg="\n".join([*error.problems, NOTHING_DEPLOYED]))
        except PlanError as error:
            result.update(failed=True, msg=str(error))
        return result

    def _secrets(self, site: Site, arguments: dict) -> VaultSiteSecrets:
        return VaultSiteSecrets(secrets_folder(site, arguments["secrets_dir"]), True, self._loader)

    def _prepare(self, sites: list[Site], arguments: dict) -> dict[str, Any]:
        """Generate missing secrets, render every deployed host's plan and build the wheelhouse.

        These are the steps dicomfleet.deployment.deploy takes before pyinfra.
        """
        generated = []
        summary = []
        for site in sites:
            with site_lock(site):
                secrets = self._secrets(site, arguments)
                for host in render.deployed_hosts(site):
                    check_plan_fields(render.plan_host(site, host, secrets))
            generated.extend(f"{site.name}/{name}" for name in secrets.generated)
            summary.append({"site": site.name, "inventory": str(site.path),
                            "hosts": render.deployed_hosts(site)})
            display.vv(f"dicomfleet: site {site.name} from {site.path} is valid: "
                       f"{len(summary[-1]['hosts'])} deployed hosts")

        folder = wheelhouse_folder(arguments["wheelhouse"])
        rebuilt = False
        if arguments["build_wheelhouse"]:
            before = _wheelhouse_state(folder)
            try:
                wheelhouse.build(folder)
            except (subprocess.CalledProcessError, OSError) as error:
                raise PlanError(f"Building the wheelhouse in {folder} failed ({error}); run "
                                "'dicomfleet wheelhouse' to see pip's output, fix the cause and run the "
                                "playbook again.") from None
            rebuilt = _wheelhouse_state(folder) != before

        for name in generated:
            display.display(f"dicomfleet: generated the secret {name}")
        return {"changed": bool(generated) or rebuilt, "sites": summary, "wheelhouse": str(folder),
                "generated_secrets": generated}

    def _plan(self, sites: list[Site], host: str, arguments: dict) -> dict[str, Any]:
        site = next((s for s in sites if host in render.deployed_hosts(s)), None)
        if site is None:
            display.vv(f"dicomfleet: host {host} runs no dicomfleet service; nothing is deployed on it")
            return {"host": host, "deployed": False}

        with site_lock(site):
            return host_plan(site, host, self._secrets(site, arguments),
                             wheelhouse_folder(arguments["wheelhouse"]))
