"""Deploy a site with pyinfra: validate the inventory, build the wheelhouse, run deploy.py.

An invalid inventory stops here, before any host is contacted.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from dicomfleet import credentials, render, wheelhouse
from dicomfleet.inventory import InventoryError, load_site
from dicomfleet.pyinfra_inventory import INVENTORY_VARIABLE

log = logging.getLogger(__name__)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet deploy", description=__doc__.splitlines()[0])
    parser.add_argument("inventory", help="inventory YAML file")
    parser.add_argument("--limit", action="append", default=[],
                        help="deploy only this inventory host or group (repeatable)")
    parser.add_argument("--dry", action="store_true", help="show what would change, change nothing")
    parser.add_argument("--parallel", type=int, default=None,
                        help="hosts deployed at once (pyinfra's default when absent)")
    return parser


def pyinfra_command(inventory: Path, limits: list[str], dry: bool = False,
                    parallel: int | None = None) -> list[str]:
    """Return the pyinfra command line that deploys INVENTORY."""
    pyinfra = str(Path(sys.executable).with_name("pyinfra"))
    command = [pyinfra, "-y", "dicomfleet.pyinfra_inventory.hosts",
               str(wheelhouse.project_root() / "deploy.py")]
    for limit in limits:
        command += ["--limit", limit]
    if dry:
        command.append("--dry")
    if parallel:
        command += ["--parallel", str(parallel)]
    return command


def deploy(inventory: Path, limits: list[str] | None = None, dry: bool = False,
           parallel: int | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    """Validate INVENTORY, build the wheelhouse and run pyinfra; return its completed process."""
    site = load_site(inventory)

    secrets = credentials.ensure_secrets(site)
    for host in render.deployed_hosts(site):
        render.plan_host(site, host, secrets)

    wheels = wheelhouse.build()
    env = dict(os.environ)
    env[INVENTORY_VARIABLE] = str(Path(inventory).resolve())
    env["DICOMFLEET_WHEELHOUSE"] = str(wheels)
    return subprocess.run(
        pyinfra_command(inventory, limits or [], dry, parallel),
        env=env, cwd=wheelhouse.project_root(), text=True,
        capture_output=capture,
    )


def main(args: list[str] | None = None) -> int:
    options = _build_parser().parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = deploy(Path(options.inventory), options.limit, options.dry, options.parallel)
    except InventoryError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        print("Nothing was deployed: fix the inventory and run the deploy again.", file=sys.stderr)
        return 1
    except credentials.SecretError as error:
        print(error, file=sys.stderr)
        print("Nothing was deployed.", file=sys.stderr)
        return 1
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
