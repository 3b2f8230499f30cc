"""Build the wheels that hosts install dicomfleet from, on the control machine.

Hosts (scanners above all) often reach no package index, so the deploy copies
this folder to each host and pip installs from it with --no-index.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Zip timestamps of the project's own wheel; a fixed value makes the wheel's
# bytes depend on its content only, so an unchanged project redeploys nothing.
REPRODUCIBLE_EPOCH = "315532800"

# Installed on hosts beside dicomfleet's own dependencies: the embedded
# MongoDB-compatible server (central hosts) and pip itself, run from its wheel.
EXTRA_REQUIREMENTS = ("secantusdb>=0.7.0b3", "pip")


def project_root() -> Path:
    """Return the checkout the package was installed from."""
    return Path(__file__).resolve().parents[2]


def default_wheelhouse() -> Path:
    """Return the wheelhouse folder of this checkout."""
    return project_root() / "build" / "wheelhouse"


def _dependencies() -> list[str]:
    import tomllib

    with open(project_root() / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)["project"]
    return list(project["dependencies"]) + list(EXTRA_REQUIREMENTS)


def _pip(*arguments: str, env: dict | None = None) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *arguments]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def build(out: Path | None = None) -> Path:
    """Build the project's wheel and its dependencies' wheels into OUT; return OUT.

    Dependency wheels are fetched again only when the dependency list changes.
    """
    out = out or default_wheelhouse()
    out.mkdir(parents=True, exist_ok=True)

    requirements = _dependencies()
    stamp = out / ".requirements"
    wanted = "\n".join(requirements) + "\n"
    if not stamp.exists() or stamp.read_text() != wanted:
        log.info("Fetching dependency wheels into %s", out)
        _pip("wheel", "--quiet", "--wheel-dir", str(out), *requirements)
        stamp.write_text(wanted)

    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, SOURCE_DATE_EPOCH=REPRODUCIBLE_EPOCH)
        _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation",
             "--wheel-dir", scratch, str(project_root()), env=env)
        (built,) = Path(scratch).glob("dicomfleet-*.whl")
        target = out / built.name
        for old in out.glob("dicomfleet-*.whl"):
            if old.name != built.name:
                old.unlink()
        if not target.exists() or target.read_bytes() != built.read_bytes():
            target.write_bytes(built.read_bytes())
            log.info("Built %s (sha256 %s)", target.name,
                     hashlib.sha256(target.read_bytes()).hexdigest()[:12])
    return out


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet wheelhouse", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="wheelhouse folder (default: build/wheelhouse in the checkout)")
    return parser


def main(args: list[str] | None = None) -> int:
    options = _build_parser().parse_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = build(options.out)
    print(f"Wheelhouse ready: {out} ({len(list(out.glob('*.whl')))} wheels).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
