"""``python -m bench``: run the benchmarks on real components and write latest.json and docs/benchmarks.md.

A quick run (``--quick``) or a run of some groups only writes quick.json or partial.json
instead, so it never replaces the full run's figures.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import environment, report, results, runner

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
FULL_JSON = ROOT / "bench" / "results" / "latest.json"
QUICK_JSON = ROOT / "bench" / "results" / "quick.json"
PARTIAL_JSON = ROOT / "bench" / "results" / "partial.json"
PAGE = ROOT / "docs" / "benchmarks.md"


def _group_list(text: str) -> list[str]:
    groups = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in groups if name not in runner.GROUPS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark group {', '.join(unknown)}; the groups are {', '.join(runner.GROUPS)}")
    return groups


def build_parser() -> argparse.ArgumentParser:
    """Return the command line parser of ``python -m bench``."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run (fewer files, studies and machines, no deploys) in a few minutes")
    parser.add_argument("--only", type=_group_list, default=None,
                        help="run only these comma-separated groups: " + ", ".join(runner.GROUPS))
    parser.add_argument("--skip", type=_group_list, default=[],
                        help="comma-separated groups not to run; their figures stay null")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for test files, servers and agents (default: a new temporary folder, "
                             "deleted afterwards)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"where to write the figures (default: {FULL_JSON.relative_to(ROOT)} for a full "
                             f"run of every group, {QUICK_JSON.relative_to(ROOT)} with --quick, "
                             f"{PARTIAL_JSON.relative_to(ROOT)} otherwise)")
    parser.add_argument("--page", type=Path, default=None,
                        help=f"where to write the page (default: {PAGE.relative_to(ROOT)} for a full run of "
                             "every group; none otherwise)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="the lowest level logged to stderr (default: INFO)")
    return parser


def selected_groups(only: list[str] | None, skip: list[str]) -> list[str]:
    """Return the groups to run, in the harness's order."""
    chosen = only if only is not None else list(runner.GROUPS)
    return [name for name in runner.GROUPS if name in chosen and name not in skip]


def default_json(quick: bool, every_group: bool) -> Path:
    """Return where a run writes its figures when --json is not given."""
    if quick:
        return QUICK_JSON
    if every_group:
        return FULL_JSON
    return PARTIAL_JSON


def command_line(args: list[str]) -> str:
    """Return the command as a reader would type it again."""
    return " ".join(["python -m bench", *args])


def main(args: list[str] | None = None) -> int:
    """Run the selected benchmark groups and write the results; return 0 when every group ran."""
    args = list(sys.argv[1:] if args is None else args)
    options = build_parser().parse_args(args)
    logging.basicConfig(level=getattr(logging, options.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    mode = runner.QUICK if options.quick else runner.FULL
    groups = selected_groups(options.only, options.skip)
    every_group = groups == list(runner.GROUPS)
    json_path = options.json or default_json(options.quick, every_group)
    page_path = options.page or (PAGE if every_group and not options.quick else None)

    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="dicomfleet-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started_at = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    machine = environment.describe_machine()
    log.info("Benchmark run (%s mode) of groups %s in %s; load average %s.", mode.name, ", ".join(groups),
             workdir, machine["load_average_at_start"])

    started = time.monotonic()
    bench_run = runner.BenchRun(mode, workdir, groups)
    try:
        collected = bench_run.run()
    finally:
        if options.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    machine["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    run = {
        "command": command_line(args),
        "mode": mode.name,
        "groups": groups,
        "ct_files": mode.ct_files,
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 1),
        "group_seconds": bench_run.group_seconds,
        "failed_groups": bench_run.failed_groups,
        "workdir": str(workdir),
    }
    document = collected.document(run, machine)
    results.write_json(json_path, document)
    log.info("Wrote %s.", json_path)
    if page_path is not None:
        report.write_page(page_path, document)
        log.info("Wrote %s.", page_path)

    if bench_run.failed_groups:
        log.error("The groups %s failed; their figures are null, with the reason under not_measured in %s.",
                  ", ".join(bench_run.failed_groups), json_path)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
