"""Tests of the agent's REST client against a real Orthanc: how each answer of POST /instances is classified."""

from __future__ import annotations

import hashlib
import os

import pytest
import requests

from agent_support import PYDICOM_FILES, AgentSite, make_instance
from dicomfleet import localservers
from dicomfleet.agent import rest


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    site = AgentSite(tmp_path_factory.mktemp("agent-rest"))
    site.orthanc.start()
    yield site.orthanc
    site.orthanc.stop()


@pytest.fixture
def session():
    with requests.Session() as session:
        yield session


def _target(orthanc, password: str | None = None) -> rest.OrthancTarget:
    username, right_password = orthanc.auth_of("ct1")
    return rest.OrthancTarget(url=orthanc.url, auth=(username, password or right_password))


def _file(tmp_path, data: bytes, name: str = "file.dcm"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path), len(data)


def test_rest_store_then_already_stored(orthanc, session, tmp_path):
    data = make_instance()
    path, size = _file(tmp_path, data)

    first = rest.store_instance(session, _target(orthanc), path, size)
    second = rest.store_instance(session, _target(orthanc), path, size)

    assert first.status == "Success"
    assert second.status == "AlreadyStored"
    assert second.instance_id == first.instance_id
    assert first.sha256 == hashlib.sha256(data).hexdigest()


def test_rest_source_machine_metadata_round_trip(orthanc, session, tmp_path):
    path, size = _file(tmp_path, make_instance())
    result = rest.store_instance(session, _target(orthanc), path, size)

    assert rest.source_machine_of(session, _target(orthanc), result.instance_id) is None
    rest.set_source_machine(session, _target(orthanc), result.instance_id, "ct1")
    assert rest.source_machine_of(session, _target(orthanc), result.instance_id) == "ct1"


def test_rest_bad_file_is_rejected(orthanc, session, tmp_path):
    path, size = _file(tmp_path, os.urandom(3000))

    with pytest.raises(rest.FileRejected, match=r"HTTP 400\): Bad file format"):
        rest.store_instance(session, _target(orthanc), path, size)


def test_rest_missing_uid_is_rejected(orthanc, session):
    path = PYDICOM_FILES / "priv_SQ.dcm"

    with pytest.raises(rest.FileRejected, match=r"HTTP 404\): Inexistent tag"):
        rest.store_instance(session, _target(orthanc), str(path), path.stat().st_size)


def test_rest_wrong_password_is_auth_error(orthanc, session, tmp_path):
    path, size = _file(tmp_path, make_instance())

    with pytest.raises(rest.AuthError) as caught:
        rest.store_instance(session, _target(orthanc, password="wrong"), path, size)

    assert caught.value.status == 401


def test_rest_closed_port_is_transient(session, tmp_path):
    path, size = _file(tmp_path, make_instance())
    target = rest.OrthancTarget(url=f"http://127.0.0.1:{localservers.free_port()}", auth=("ct1", "x"))

    with pytest.raises(rest.TransientError, match="cannot connect to Orthanc"):
        rest.store_instance(session, target, path, size)


def test_rest_file_shorter_than_queued_raises(orthanc, session, tmp_path):
    data = make_instance()
    path, _ = _file(tmp_path, data)

    with pytest.raises(rest.FileChangedError, match=f"of the {len(data) + 100} bytes"):
        rest.store_instance(session, _target(orthanc), path, len(data) + 100)


def test_rest_md5_only_when_requested(orthanc, session, tmp_path):
    data = make_instance()
    path, size = _file(tmp_path, data)

    with_md5 = rest.store_instance(session, _target(orthanc), path, size)
    without_md5 = rest.store_instance(session, _target(orthanc), path, size, with_md5=False)

    assert with_md5.md5 == hashlib.md5(data).hexdigest()
    assert without_md5.md5 == ""
    assert without_md5.sha256 == hashlib.sha256(data).hexdigest()


def test_rest_metadata_of_unknown_instance_not_found(orthanc, session):
    unknown = rest.instance_id_of("nobody", "1.2.3", "1.2.3.4", "1.2.3.4.5")

    with pytest.raises(rest.InstanceNotFound, match="HTTP 404"):
        rest.set_source_machine(session, _target(orthanc), unknown, "ct1")


def test_rest_upload_session_reads_proxy_once(orthanc, monkeypatch, tmp_path):
    path, size = _file(tmp_path, make_instance())
    # A proxy that does not exist: Orthanc is reached only because no_proxy names its host.
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{localservers.free_port()}")
    monkeypatch.setenv("no_proxy", "127.0.0.1")

    with rest.new_session() as upload_session:
        first = rest.store_instance(upload_session, _target(orthanc), path, size)
        monkeypatch.delenv("no_proxy")
        second = rest.store_instance(upload_session, _target(orthanc), path, size)

    assert first.status == "Success"
    assert second.status == "AlreadyStored"
