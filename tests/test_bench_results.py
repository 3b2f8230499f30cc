"""Unit tests of bench.results: every required key is present, derived ratios, and nulls with reasons."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# bench/ is a top-level package of the checkout, not part of the installed dicomfleet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import REQUIRED_KEYS, SPECS, Results, write_json  # noqa: E402


def test_required_keys_all_have_specs():
    missing = [key for key in REQUIRED_KEYS if key not in SPECS]
    assert missing == []


def test_document_has_every_key_at_top_level():
    document = Results().document({"mode": "full"}, {"nproc": 2})
    absent = [key for key in SPECS if key not in document]
    assert absent == []


def test_document_unmeasured_key_is_null_with_reason():
    document = Results().document({}, {})
    assert document["fleet_files_lost"] is None
    assert document["not_measured"]["fleet_files_lost"] == "not run in this invocation"


def test_set_unknown_key_raises():
    with pytest.raises(KeyError, match="not a benchmark figure"):
        Results().set("files_per_second", 1.0)


def test_set_none_records_reason():
    results = Results()
    results.set("storescu_files_per_s", None, note="storescu was rejected")
    assert results.not_measured["storescu_files_per_s"] == "storescu was rejected"


def test_set_value_clears_earlier_reason():
    results = Results()
    results.skip(["storescu_files_per_s"], "not yet")
    results.set("storescu_files_per_s", 14.0)
    assert "storescu_files_per_s" not in results.not_measured


def test_derive_best_rest_client_is_fastest():
    results = Results()
    results.set("curl_loop_files_per_s", 75.0, command="curl loop")
    results.set("keepalive_4_workers_files_per_s", 300.0, command="four workers")
    results.set("xargs_curl_files_per_s", 150.0, command="xargs")
    results.derive()
    assert results.value("best_rest_client_files_per_s") == 300.0
    assert results.figures["best_rest_client_files_per_s"].command == "four workers"


def test_derive_agent_ratios():
    results = Results()
    results.set("curl_loop_files_per_s", 75.0)
    results.set("keepalive_4_workers_files_per_s", 300.0)
    results.set("agent_backlog_files_per_s", 150.0)
    results.derive()
    assert results.value("ratio_agent_vs_best_rest") == 0.5
    assert results.value("ratio_agent_vs_curl_loop") == 2.0


def test_derive_ratio_without_numerator_is_null_with_reason():
    results = Results()
    results.set("storescu_files_per_s", 14.0)
    results.derive()
    assert results.value("ratio_cstore_vs_storescu") is None
    assert "cstore_files_per_s not measured" in results.not_measured["ratio_cstore_vs_storescu"]


def test_derive_fastest_client_ratio():
    results = Results()
    results.set("storescu_files_per_s", 16.0)
    results.set("keepalive_4_workers_files_per_s", 140.0)
    results.set("pynetdicom_4assoc_files_per_s", 48.0)
    results.derive()
    assert results.value("ratio_fastest_client_vs_storescu") == 8.75


def test_derive_ansible_ratio():
    results = Results()
    results.set("deploy_lab_rerun_s", 10.0)
    results.set("ansible_lab_rerun_s", 25.0)
    results.derive()
    assert results.value("ratio_ansible_vs_pyinfra_rerun") == 2.5


def test_derive_2gb_figure_from_2gb_file():
    results = Results()
    results.set("agent_large_file_mb", 1999.6)
    results.set("agent_peak_rss_mb_large_file", 40.0)
    results.derive()
    assert results.value("agent_peak_rss_mb_2gb_file") == 40.0


def test_derive_2gb_figure_null_for_small_file():
    results = Results()
    results.set("agent_large_file_mb", 200.0)
    results.set("agent_peak_rss_mb_large_file", 40.0)
    results.derive()
    assert results.value("agent_peak_rss_mb_2gb_file") is None


def test_derive_10k_figures_need_10k_studies():
    results = Results()
    results.set("idle_cycle_studies", 520)
    results.set("sync_idle_cycle_bytes", 600.0)
    results.set("poll_idle_cycle_bytes", 500000.0)
    results.derive()
    assert results.value("sync_idle_cycle_bytes_10k_studies") is None
    assert "fewer than 10,000" in results.not_measured["poll_idle_cycle_bytes_10k_studies"]


def test_derive_10k_figures_with_10k_studies():
    results = Results()
    results.set("idle_cycle_studies", 10_020)
    results.set("sync_idle_cycle_bytes", 600.0)
    results.set("poll_idle_cycle_bytes", 9_000_000.0)
    results.derive()
    assert results.value("sync_idle_cycle_bytes_10k_studies") == 600.0
    assert results.value("poll_idle_cycle_bytes_10k_studies") == 9_000_000.0


def test_write_json_round_trip(tmp_path):
    results = Results()
    results.set("fleet_files_lost", 0, command="fleet")
    path = tmp_path / "results" / "latest.json"
    write_json(path, results.document({"mode": "quick"}, {"nproc": 2}))
    document = json.loads(path.read_text())
    assert document["fleet_files_lost"] == 0
    assert document["figures"]["fleet_files_lost"]["command"] == "fleet"
    assert not (tmp_path / "results" / "latest.json.tmp").exists()


def test_derive_fleet_page_full_size():
    results = Results()
    results.set("fleet_page_machines", 200)
    results.set("fleet_page_studies", 100_000)
    results.set("fleet_page_p95_ms", 120.0)
    results.derive()
    assert results.value("dashboard_fleet_page_p95_ms") == 120.0


def test_derive_fleet_page_small_site_is_null():
    results = Results()
    results.set("fleet_page_machines", 200)
    results.set("fleet_page_studies", 10_000)
    results.set("fleet_page_p95_ms", 40.0)
    results.derive()
    assert results.value("dashboard_fleet_page_p95_ms") is None
