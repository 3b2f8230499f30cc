"""Describe the machine a benchmark ran on: cores, memory, load, and the versions of every component.

A figure means little without the machine and the software behind it, so each run records them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

from dicomfleet import localservers, wheelhouse


def _first_line(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else None


def parse_orthanc_version(line: str | None) -> str | None:
    """Return the version from ``Orthanc --version``'s first line, for example "1.10.1"."""
    match = re.search(r"Orthanc\s+(\S+)", line or "")
    return match.group(1) if match else None


def parse_dcmtk_version(line: str | None) -> str | None:
    """Return the version from a DCMTK tool's ``--version`` first line, for example "3.6.7"."""
    match = re.search(r"\bv(\d+\.\d+\.\d+)", line or "")
    return match.group(1) if match else None


def parse_curl_version(line: str | None) -> str | None:
    """Return the version from ``curl --version``'s first line, for example "7.88.1"."""
    match = re.match(r"curl\s+(\S+)", line or "")
    return match.group(1) if match else None


def memory_total_mb(meminfo: str) -> int | None:
    """Return MemTotal in MiB from the text of /proc/meminfo."""
    match = re.search(r"^MemTotal:\s+(\d+)\s+kB", meminfo, re.MULTILINE)
    return int(match.group(1)) // 1024 if match else None


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def _git_commit() -> str | None:
    root = wheelhouse.project_root()
    commit = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    if commit is None:
        return None
    status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                            timeout=30, check=False).stdout
    return commit + (" with uncommitted changes" if status.strip() else "")


def describe_machine() -> dict:
    """Return the machine's cores, memory, CPU, kernel, load and the versions of the benchmarked software."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        meminfo = ""
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        debian = None

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "memory_mb": memory_total_mb(meminfo),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "debian": debian,
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "orthanc": parse_orthanc_version(_first_line([localservers.ORTHANC_BINARY, "--version"])),
        "python": platform.python_version(),
        "dcmtk": parse_dcmtk_version(_first_line(["storescu", "--version"])),
        "curl": parse_curl_version(_first_line(["curl", "--version"])),
        "pynetdicom": _package_version("pynetdicom"),
        "pydicom": _package_version("pydicom"),
        "requests": _package_version("requests"),
        "pymongo": _package_version("pymongo"),
        "secantusdb": _package_version("secantusdb"),
        "pyinfra": _package_version("pyinfra"),
        "ansible_core": _package_version("ansible-core"),
        "dicomfleet": _package_version("dicomfleet"),
        "git_commit": _git_commit(),
    }
