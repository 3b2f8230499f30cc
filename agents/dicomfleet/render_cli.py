"""Render every file the deploy would put on every host into OUTDIR/HOST/.

No host is contacted. Secrets that the first deploy has not generated yet are
written as a placeholder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicomfleet import credentials, render
from dicomfleet.inventory import InventoryError, load_site


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet render", description=__doc__.splitlines()[0])
    parser.add_argument("inventory", help="inventory YAML file")
    parser.add_argument("outdir", type=Path, help="folder to write the rendered files into")
    return parser


def main(args: list[str] | None = None) -> int:
    options = _build_parser().parse_args(args)
    try:
        site = load_site(options.inventory)
    except InventoryError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 1

    written = render.render_site(site, options.outdir, credentials.existing_secrets(site))
    print(f"Rendered {len(written)} files for {len(render.deployed_hosts(site))} hosts into {options.outdir}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
