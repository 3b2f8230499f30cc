"""The ``dicomfleet`` command: one subcommand per tool.

Each subcommand lives in its own module with a ``main(args=None)``; this module
only dispatches, so ``dicomfleet agent --help`` shows the agent's own options.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line summary)
COMMANDS = {
    "validate": ("dicomfleet.validation_cli", "check an inventory and print every problem"),
    "render": ("dicomfleet.render_cli", "render every file the deploy would put on every host"),
    "deploy": ("dicomfleet.deployment", "validate the inventory, build the wheelhouse and run pyinfra"),
    "agent": ("dicomfleet.agent.service", "run the agent: watch export folders and send to Orthanc"),
    "sync": ("dicomfleet.sync.service", "run the sync: follow Orthanc's change feed into MongoDB"),
    "lab": ("dicomfleet.lab", "boot or stop the local systemd-nspawn lab hosts"),
    "demo": ("dicomfleet.demo", "drop real DICOM files on the lab scanners and report where they landed"),
    "wheelhouse": ("dicomfleet.wheelhouse", "build the wheels the hosts install from"),
    "backup": ("dicomfleet.backup", "back up Orthanc's index or storage into the backup folder"),
    "restore": ("dicomfleet.restore", "rebuild a fresh Orthanc from a backup and check every file"),
    "dashboard": ("dicomfleet.dashboard.service", "run the fleet dashboard and receive the agents' heartbeats"),
    "status": ("dicomfleet.status", "print each machine's state, last heartbeat and today's counts"),
    "check": ("dicomfleet.check", "send a test image through one machine's ingest path and check it arrives"),
}


def _usage() -> str:
    lines = ["usage: dicomfleet COMMAND [options]", "", "commands:"]
    for name, (_, summary) in COMMANDS.items():
        lines.append(f"  {name:<11} {summary}")
    lines.append("")
    lines.append("Run 'dicomfleet COMMAND --help' for a command's options.")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> int:
    """Run the subcommand named by the first of ARGS."""
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2

    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"dicomfleet: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2

    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
