"""Unit tests of the harness's readers of tool output and /proc files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# bench/ is a top-level package of the checkout, not part of the installed dicomfleet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import environment  # noqa: E402
from bench.agent_bench import read_peak_rss_kib  # noqa: E402
from bench.fleet import read_sent_count  # noqa: E402

PROC_STATUS = """Name:\tpython3
VmPeak:\t  312048 kB
VmSize:\t  312048 kB
VmHWM:\t   38620 kB
VmRSS:\t   36112 kB
"""


def test_orthanc_version_parsed():
    assert environment.parse_orthanc_version("Orthanc 1.10.1") == "1.10.1"


def test_orthanc_version_missing_binary():
    assert environment.parse_orthanc_version(None) is None


def test_dcmtk_version_parsed():
    assert environment.parse_dcmtk_version("$dcmtk: storescu v3.6.7 2022-04-22 $") == "3.6.7"


def test_curl_version_parsed():
    line = "curl 7.88.1 (x86_64-pc-linux-gnu) libcurl/7.88.1 OpenSSL/3.0.15"
    assert environment.parse_curl_version(line) == "7.88.1"


def test_memory_total_in_mib():
    assert environment.memory_total_mb("MemTotal:       24683520 kB\nMemFree: 1 kB\n") == 24105


def test_peak_rss_read_from_vmhwm():
    assert read_peak_rss_kib(PROC_STATUS) == 38620


def test_peak_rss_absent_is_none():
    assert read_peak_rss_kib("Name:\tkthreadd\n") is None


def test_sent_count_sums_machines(tmp_path):
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"machines": {"ct001": {"files_sent_today": 80},
                                               "ct002": {"files_sent_today": 4}}}))
    assert read_sent_count(status) == 84


@pytest.mark.parametrize("content", ["{not json", None])
def test_sent_count_unreadable_is_none(tmp_path, content):
    status = tmp_path / "status.json"
    if content is not None:
        status.write_text(content)
    assert read_sent_count(status) is None
