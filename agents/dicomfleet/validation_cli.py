"""Check inventories and print every problem found.

Exit status 0 when every inventory is valid, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

from dicomfleet.inventory import InventoryError, load_site


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet validate", description=__doc__.splitlines()[0])
    parser.add_argument("inventory", nargs="+", help="inventory YAML file(s)")
    return parser


def main(args: list[str] | None = None) -> int:
    options = _build_parser().parse_args(args)
    failed = False
    for path in options.inventory:
        try:
            site = load_site(path)
        except InventoryError as error:
            failed = True
            for problem in error.problems:
                print(problem, file=sys.stderr)
            continue
        print(f"{path}: valid: site {site.name}, {len(site.servers)} Orthanc server(s), "
              f"{len(site.machines)} machine(s).")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
