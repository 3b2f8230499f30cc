"""Tests of the after-send policies against a real Orthanc: archive and delete only verified files.

A file is verified when the MD5 Orthanc reports for its stored copy equals the MD5 of
the bytes sent; its spool record then goes to the state ``verified``.
"""

from __future__ import annotations

import shutil

import pytest

from agent_support import AgentSite, make_instance, md5, sop_instance_uid, wait_until


@pytest.fixture(scope="module")
def archive_site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agent-aftersend")
    # The machine is registered for C-STORE; the REST tests switch its config to transport "rest".
    site = AgentSite(folder, {"dicomfleet_transport": "cstore", "dicomfleet_after_send": "archive",
                              "dicomfleet_archive_folder": str(folder / "archive")})
    site.orthanc.start()
    yield site
    site.stop_all()


@pytest.fixture
def site(archive_site):
    archive_site.reset()
    shutil.rmtree(archive_site.folder / "archive", ignore_errors=True)
    yield archive_site
    archive_site.stop_agents()


def _configure(site: AgentSite, transport: str, after_send: str) -> None:
    config = site.write_config()
    text = config.read_text().replace('transport = "cstore"', f'transport = "{transport}"')
    text = text.replace('after_send = "archive"', f'after_send = "{after_send}"')
    config.write_text(text)


def _drop(site: AgentSite, count: int) -> dict[str, bytes]:
    files = {f"study/slice-{number}.dcm": make_instance() for number in range(count)}
    for name, data in files.items():
        path = site.watch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _wait_verified(site: AgentSite, count: int) -> list[dict]:
    def verified() -> list[dict] | None:
        rows = site.spool_rows()
        if len(rows) == count and all(row["state"] == "verified" for row in rows):
            return rows
        return None

    return wait_until(verified, 20, interval=0.1, message=f"{count} verified spool records")


def test_archive_moves_verified_rest_files(site):
    _configure(site, "rest", "archive")
    site.start_agent()
    files = _drop(site, 3)

    stored = site.wait_stored([sop_instance_uid(data) for data in files.values()])
    _wait_verified(site, len(files))

    archive = site.folder / "archive"
    for name, data in files.items():
        assert not (site.watch / name).exists()
        assert (archive / name).read_bytes() == data
        assert site.stored_md5(stored[sop_instance_uid(data)]) == md5(data)


def test_archive_moves_verified_cstore_files(site):
    _configure(site, "cstore", "archive")
    agent = site.start_agent()
    files = _drop(site, 3)

    site.wait_stored([sop_instance_uid(data) for data in files.values()])
    _wait_verified(site, len(files))

    archive = site.folder / "archive"
    for name, data in files.items():
        assert not (site.watch / name).exists()
        assert (archive / name).read_bytes() == data
    assert agent.log_text().count("and archived file") == len(files)


def test_delete_removes_verified_files(site):
    _configure(site, "rest", "delete")
    agent = site.start_agent()
    files = _drop(site, 3)

    site.wait_stored([sop_instance_uid(data) for data in files.values()])
    _wait_verified(site, len(files))

    for name in files:
        assert not (site.watch / name).exists()
    assert agent.log_text().count("and deleted file") == len(files)
    assert site.statistics()["CountInstances"] == len(files)


def test_delete_applies_after_restart_to_sent_files(site):
    _configure(site, "rest", "keep")
    agent = site.start_agent()
    files = _drop(site, 2)
    site.wait_stored([sop_instance_uid(data) for data in files.values()])
    agent.wait_for_log("Stored file", len(files))
    assert agent.stop() == 0
    assert {row["state"] for row in site.spool_rows()} == {"sent"}

    _configure(site, "rest", "delete")
    site.start_agent()
    _wait_verified(site, len(files))

    for name in files:
        assert not (site.watch / name).exists()
    assert site.statistics()["CountInstances"] == len(files)
