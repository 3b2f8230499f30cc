"""Write docs/benchmarks.md from a latest.json document: the machine, every figure and the command behind it.

The page keeps its hand-written introduction: everything above the marker line stays as it is.
"""

from __future__ import annotations

from pathlib import Path

from bench.results import SPECS
from bench.stats import rounded

MARKER = "<!-- Everything below this line is written by `python -m bench`; edit the introduction above it. -->"

DEFAULT_INTRO = """# Benchmarks

`make bench` measures dicomfleet against the tools a site uses today, on real components,
in one run on one machine, and writes this page and `bench/results/latest.json`.
"""

# Seconds for the 300 CT slices in an earlier single run on a 2-core machine of the same kind.
# The page shows them beside this run's figures, so drift between runs is visible.
EARLIER_SECONDS = {
    "curl_loop_files_per_s": 4.0,
    "xargs_curl_files_per_s": 1.9,
    "keepalive_sequential_files_per_s": 1.65,
    "keepalive_4_workers_files_per_s": 1.0,
    "storescu_files_per_s": 21.7,
    "pynetdicom_1assoc_files_per_s": 18.2,
    "pynetdicom_1assoc_nodelay_files_per_s": 16.2,
    "pynetdicom_4assoc_files_per_s": 6.4,
    "pynetdicom_1assoc_quickack_files_per_s": 3.3,
}

HEADLINES = (
    "ratio_agent_vs_best_rest", "ratio_agent_after_start_vs_best_rest", "ratio_agent_vs_curl_loop",
    "agent_latency_p50_s", "agent_latency_p99_s",
    "ratio_cstore_vs_storescu", "agent_peak_rss_mb_2gb_file", "sync_stable_to_record_p50_s",
    "sync_catchup_studies_per_s", "sync_idle_cycle_bytes_10k_studies", "poll_idle_cycle_bytes_10k_studies",
    "fleet_machines", "fleet_files_lost", "dashboard_fleet_page_p95_ms", "deploy_lab_cold_s",
    "deploy_lab_rerun_s", "deploy_rerun_changes", "ratio_ansible_vs_pyinfra_rerun",
)

SECTION_TITLES = {
    "rest": "Sending CT slices over REST",
    "dicom": "Sending CT slices over DICOM (C-STORE)",
    "agent": "The agent alone",
    "sync": "The sync",
    "fleet": "The fleet",
    "dashboard": "The dashboard",
    "deploy": "Deploys on lab hosts",
}

MACHINE_ROWS = (
    ("nproc", "cores (nproc)"), ("memory_mb", "memory, MiB"), ("cpu_model", "CPU"), ("kernel", "kernel"),
    ("debian", "Debian"), ("orthanc", "Orthanc"), ("python", "Python"), ("dcmtk", "DCMTK"), ("curl", "curl"),
    ("pynetdicom", "pynetdicom"), ("pydicom", "pydicom"), ("requests", "requests"), ("pymongo", "pymongo"),
    ("secantusdb", "SecantusDB"), ("pyinfra", "pyinfra"), ("ansible_core", "ansible-core"),
    ("dicomfleet", "dicomfleet"), ("git_commit", "commit"),
    ("load_average_at_start", "load average at start (1, 5, 15 min)"),
    ("load_average_at_end", "load average at end (1, 5, 15 min)"),
)


def format_value(value) -> str:
    """Format a figure for the page: three significant digits, whole numbers as they are, null spelled out."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{rounded(value)}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _machine_section(document: dict) -> list[str]:
    run = document.get("run", {})
    machine = document.get("machine", {})
    lines = ["## The run", ""]
    lines.append(f"- Command: `{run.get('command', 'python -m bench')}` ({run.get('mode', 'full')} mode)")
    lines.append(f"- Started {run.get('started_at')}, took {format_value(run.get('duration_s'))} s")
    groups = run.get("group_seconds") or {}
    if groups:
        lines.append("- Seconds per group: " + ", ".join(f"{name} {seconds}" for name, seconds in groups.items()))
    lines += ["", "| machine | value |", "|---|---|"]
    for key, label in MACHINE_ROWS:
        value = machine.get(key)
        if isinstance(value, list):
            value = ", ".join(str(item) for item in value)
        lines.append(f"| {label} | {_escape(value if value is not None else 'unknown')} |")
    load = machine.get("load_average_at_start") or [0.0]
    if load[0] > 1.0:
        lines += ["", f"The 1-minute load average was {load[0]} when the run started: other work shared "
                      "the cores, so compare the ratios of this run, not its absolute times, with other runs."]
    return lines


def _headline_section(document: dict) -> list[str]:
    lines = ["## Headline figures", "", "| figure | value | unit | what it compares |", "|---|---|---|---|"]
    for key in HEADLINES:
        spec = SPECS[key]
        lines.append(f"| `{key}` | {format_value(document.get(key))} | {spec.unit} | {_escape(spec.description)} |")
    return lines


def _figure_section(document: dict, section: str) -> list[str]:
    keys = [key for key, spec in SPECS.items() if spec.section == section]
    earlier = document.get("run", {}).get("ct_files") == 300 and section in ("rest", "dicom")
    header = "| figure | value | unit | what it measures |"
    rule = "|---|---|---|---|"
    if earlier:
        header = "| figure | value | unit | seconds per run (earlier run) | what it measures |"
        rule = "|---|---|---|---|---|"
    lines = [f"## {SECTION_TITLES[section]}", "", header, rule]
    figures = document.get("figures", {})
    for key in keys:
        spec = SPECS[key]
        cells = [f"`{key}`", format_value(document.get(key)), spec.unit]
        if earlier:
            samples = figures.get(key, {}).get("samples") or []
            measured = ", ".join(format_value(sample) for sample in samples) or "-"
            before = EARLIER_SECONDS.get(key)
            cells.append(f"{measured} ({before})" if before is not None else measured)
        cells.append(_escape(spec.description))
        lines.append("| " + " | ".join(cells) + " |")

    commands = []
    for key in keys:
        figure = figures.get(key)
        if not figure or not (figure.get("command") or figure.get("note")):
            continue
        entry = f"- `{key}`"
        if figure.get("command"):
            entry += f": `{figure['command']}`"
        if figure.get("note"):
            entry += f". {figure['note']}"
        commands.append(entry)
    if commands:
        lines += ["", "How each figure was measured:", ""] + commands
    return lines


def _not_measured_section(document: dict) -> list[str]:
    missing = document.get("not_measured") or {}
    if not missing:
        return []
    lines = ["## Not measured in this run", "", "| figure | reason |", "|---|---|"]
    for key, reason in missing.items():
        lines.append(f"| `{key}` | {_escape(reason)} |")
    return lines


def render_page(document: dict, intro: str = DEFAULT_INTRO) -> str:
    """Return the whole benchmark page for DOCUMENT, INTRO first."""
    parts = [intro.rstrip() + "\n", MARKER, ""]
    sections = [_machine_section(document), _headline_section(document)]
    sections += [_figure_section(document, section) for section in SECTION_TITLES]
    sections.append(_not_measured_section(document))
    for lines in sections:
        if lines:
            parts.append("\n".join(lines))
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def existing_intro(path: Path) -> str:
    """Return the hand-written introduction of the page at PATH, or the default one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return DEFAULT_INTRO
    if MARKER not in text:
        return DEFAULT_INTRO
    return text.split(MARKER, 1)[0]


def write_page(path: Path, document: dict) -> None:
    """Rewrite the page at PATH for DOCUMENT, keeping its introduction."""
    page = render_page(document, existing_intro(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
