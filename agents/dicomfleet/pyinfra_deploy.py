"""pyinfra deploys that put a host's plan (from dicomfleet.render) in place.

deploy.py calls ``apply_plan`` for each host; every operation is named in
sentence case and a service restarts only when a file it reads changed.
"""

from __future__ import annotations

import io
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import File
from pyinfra.operations import apt, files, server, systemd
from pyinfra.operations.util import any_changed

from dicomfleet import render


@deploy("Install the Debian packages")
def install_packages(plan: render.HostPlan) -> None:
    """Install PLAN's Debian packages (Orthanc on a central host)."""
    if not plan.apt_packages:
        return
    apt.packages(
        name="Ensure the Debian packages are installed.",
        packages=plan.apt_packages,
        update=True,
        cache_time=3600,
        _env={"DEBIAN_FRONTEND": "noninteractive"},
    )


@deploy("Create the service users")
def create_users(plan: render.HostPlan) -> None:
    """Create one system user per dicomfleet service on the host."""
    for user in plan.users:
        server.user(
            name=f"Ensure the system user {user} exists.",
            user=user,
            system=True,
            shell="/usr/sbin/nologin",
            home="/nonexistent",
            ensure_home=False,
            create_home=False,
        )


@deploy("Install the dicomfleet virtual environment")
def install_venv(plan: render.HostPlan, wheelhouse: Path):
    """Copy the wheelhouse to the host and install dicomfleet into its own venv.

    Hosts reach no Python package index, so pip installs from the copied
    wheels only. Returns the install operation, or None when the host needs
    no venv.
    """
    if not plan.needs_venv:
        return None

    wheels = files.sync(
        name="Ensure the wheelhouse is on the host.",
        src=str(wheelhouse),
        dest=render.WHEELHOUSE,
        delete=True,
        mode="0644",
        dir_mode="0755",
    )
    venv = None
    if not host.get_fact(File, path=f"{render.VENV}/pyvenv.cfg"):
        venv = server.shell(
            name="Create the virtual environment.",
            commands=[f"python3 -m venv --without-pip {render.VENV}"],
        )
    packages = "dicomfleet secantusdb" if render.ROLE_CENTRAL in plan.roles else "dicomfleet"
    pip = f"{render.VENV}/bin/python $(ls {render.WHEELHOUSE}/pip-*.whl | head -n1)/pip"
    return server.shell(
        name="Install dicomfleet from the wheelhouse.",
        commands=[
            f"{pip} install --quiet --no-index --find-links {render.WHEELHOUSE} {packages}",
            # The version stays the same between builds, so reinstall the changed wheel itself.
            f"{pip} install --quiet --no-index --no-deps --force-reinstall {render.WHEELHOUSE}/dicomfleet-*.whl",
        ],
        _if=any_changed(*[op for op in (wheels, venv) if op is not None]),
    )


@deploy("Put the configuration in place")
def put_files(plan: render.HostPlan) -> tuple[dict[str, list], list, dict[str, object]]:
    """Create PLAN's folders and files.

    Returns the file operations per unit they restart, the operations that
    write unit files, and the file operations by path.
    """
    for directory in plan.directories:
        files.directory(
            name=f"Ensure the folder {directory.path} exists.",
            path=directory.path,
            user=directory.owner,
            group=directory.group,
            mode=directory.mode,
        )

    changes: dict[str, list] = {}
    unit_files = []
    file_operations: dict[str, object] = {}
    for removed in plan.removed_paths:
        operation = files.file(
            name=f"Ensure {removed.path} is absent.",
            path=removed.path,
            present=False,
            # A symbolic link (Debian's enabled sites) is removed too, without a backup copy.
            force=True,
            force_backup=False,
        )
        for unit in removed.restarts:
            changes.setdefault(unit, []).append(operation)

    for managed in plan.files:
        operation = files.put(
            name=f"Ensure {managed.path} is up to date.",
            src=io.BytesIO(managed.content.encode("utf-8")),
            dest=managed.path,
            user=managed.owner,
            group=managed.group,
            mode=managed.mode,
        )
        file_operations[managed.path] = operation
        for unit in managed.restarts:
            changes.setdefault(unit, []).append(operation)
        if managed.path.startswith("/etc/systemd/system/"):
            unit_files.append(operation)
    return changes, unit_files, file_operations


@deploy("Start the services")
def start_services(plan: render.HostPlan, changes: dict[str, list], unit_files: list) -> None:
    """Enable and start PLAN's services, restarting those whose files changed.

    UNIT_FILES are the operations that write systemd unit files.
    """
    if unit_files:
        systemd.daemon_reload(
            name="Reload systemd's unit files.",
            _if=any_changed(*unit_files),
        )

    for unit in plan.services:
        systemd.service(
            name=f"Ensure {unit} is enabled and running.",
            service=unit,
            running=True,
            enabled=True,
        )
        if unit in changes:
            systemd.service(
                name=f"Restart {unit} after its configuration changed.",
                service=unit,
                running=True,
                restarted=True,
                _if=any_changed(*changes[unit]),
            )


@deploy("Run the commands that follow changed files")
def run_commands(plan: render.HostPlan, file_operations: dict[str, object]) -> None:
    """Run each of PLAN's commands whose watched files changed in this deploy."""
    for command in plan.commands:
        watched = [file_operations[path] for path in command.after_changes if path in file_operations]
        if not watched:
            continue
        server.shell(
            name=command.name,
            commands=[command.command],
            _if=any_changed(*watched),
        )


def apply_plan(plan: render.HostPlan, wheelhouse: Path) -> None:
    """Put PLAN on the current host: packages, users, venv, files, services, then commands."""
    install_packages(plan)
    create_users(plan)
    installed = install_venv(plan, wheelhouse)
    changes, unit_files, file_operations = put_files(plan)
    if installed is not None:
        # New code restarts every dicomfleet service that runs it.
        for unit in plan.services:
            if unit.startswith("dicomfleet-"):
                changes.setdefault(unit, []).append(installed)
    start_services(plan, changes, unit_files)
    run_commands(plan, file_operations)
