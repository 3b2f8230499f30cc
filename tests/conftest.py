"""Shared fixtures: real Orthanc and SecantusDB servers on loopback ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomfleet import localservers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The checkout under test."""
    return ROOT


@pytest.fixture(scope="session")
def mongodb_server(tmp_path_factory):
    """One SecantusDB server for the session; each test uses its own database name."""
    server = localservers.SecantusProcess(tmp_path_factory.mktemp("secantus")).start()
    yield server
    server.stop()
