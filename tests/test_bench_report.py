"""Unit tests of bench.report: the page keeps its introduction and shows every figure and its command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# bench/ is a top-level package of the checkout, not part of the installed dicomfleet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402
from bench.__main__ import build_parser, default_json, selected_groups  # noqa: E402
from bench.results import Results  # noqa: E402


def _document() -> dict:
    results = Results()
    results.set("curl_loop_files_per_s", 75.123456, command="for f in ct/*.dcm; do curl ...; done",
                note="300 files", samples=[4.0])
    results.set("keepalive_4_workers_files_per_s", 300.0, command="four workers")
    results.set("fleet_files_lost", 0, command="fleet")
    results.derive()
    run = {"command": "python -m bench", "mode": "full", "ct_files": 300, "started_at": "2026-01-01T00:00:00+00:00",
           "duration_s": 900.0, "group_seconds": {"sending": 100.0}}
    machine = {"nproc": 2, "memory_mb": 24105, "orthanc": "1.10.1", "load_average_at_start": [0.2, 0.3, 0.4]}
    return results.document(run, machine)


@pytest.mark.parametrize("value, text", [(None, "null"), (0, "0"), (8400, "8,400"), (75.123456, "75.1"),
                                         (9123456.7, "9,123,457"), (0.0012345, "0.00123")])
def test_format_value(value, text):
    assert report.format_value(value) == text


def test_page_shows_figure_and_command():
    page = report.render_page(_document())
    assert "| `curl_loop_files_per_s` | 75.1 | files/s | 4.0 (4.0) |" in page
    assert "- `curl_loop_files_per_s`: `for f in ct/*.dcm; do curl ...; done`. 300 files" in page


def test_page_lists_null_figures_with_reason():
    page = report.render_page(_document())
    assert "| `fleet_files_stored` | null | files |" in page
    assert "| `fleet_files_stored` | not run in this invocation |" in page


def test_page_shows_machine():
    page = report.render_page(_document())
    assert "| cores (nproc) | 2 |" in page
    assert "| Orthanc | 1.10.1 |" in page


def test_write_page_keeps_introduction(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\nHand-written words.\n\n" + report.MARKER + "\nold figures\n")
    report.write_page(path, _document())
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written words.\n")
    assert "old figures" not in text
    assert text.count(report.MARKER) == 1


def test_write_page_without_marker_uses_default_intro(tmp_path):
    path = tmp_path / "benchmarks.md"
    report.write_page(path, _document())
    assert path.read_text().startswith(report.DEFAULT_INTRO)


def test_selected_groups_keep_harness_order():
    assert selected_groups(["deploy", "sending"], []) == ["sending", "deploy"]


def test_selected_groups_skip():
    assert selected_groups(None, ["deploy", "fleet"]) == ["sending", "agent", "sync", "dashboard"]


def test_parser_rejects_unknown_group(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--only", "sending,network"])
    assert "unknown benchmark group network" in capsys.readouterr().err


@pytest.mark.parametrize("quick, every_group, name", [(False, True, "latest.json"), (True, True, "quick.json"),
                                                      (False, False, "partial.json")])
def test_default_json_by_run_kind(quick, every_group, name):
    assert default_json(quick, every_group).name == name
