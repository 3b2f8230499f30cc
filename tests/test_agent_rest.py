"""Tests of the agent's REST client against a real Orthanc: how each answer of POST /instances is classified."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
import requests

from agent_support import PYDICOM_FILES, AgentSite, make_instance
from dicomfleet import localservers
from dicomfleet.agent import rest
from dicomfleet.agent.httpclient import HttpClient


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    site = AgentSite(tmp_path_factory.mktemp("agent-rest"))
    site.orthanc.start()
    yield site.orthanc
    site.orthanc.stop()


@pytest.fixture
def session():
    with HttpClient() as client:
        yield client


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


def test_rest_upload_records_machine_user(orthanc, session, tmp_path):
    path, size = _file(tmp_path, make_instance())
    result = rest.store_instance(session, _target(orthanc), path, size)

    answer = requests.get(f"{orthanc.url}/instances/{result.instance_id}/metadata/HttpUsername",
                          auth=orthanc.admin_auth, timeout=10)
    assert answer.text == orthanc.auth_of("ct1")[0]


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

    with pytest.raises(rest.TransientError, match="cannot reach 127.0.0.1"):
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


def test_rest_md5_of_unknown_instance_not_found(orthanc, session):
    unknown = rest.instance_id_of("nobody", "1.2.3", "1.2.3.4", "1.2.3.4.5")

    with pytest.raises(rest.InstanceNotFound, match="HTTP 404"):
        rest.stored_md5(session, _target(orthanc), unknown)


def test_rest_dataset_md5_of_unknown_instance_not_found(orthanc, session):
    unknown = rest.instance_id_of("nobody", "1.2.3", "1.2.3.4", "1.2.3.5")

    with pytest.raises(rest.InstanceNotFound, match="HTTP 404"):
        rest.stored_dataset_md5(session, _target(orthanc), unknown)


def test_rest_upload_survives_orthanc_restart_on_kept_connection(orthanc, session, tmp_path):
    first_path, first_size = _file(tmp_path, make_instance(), "first.dcm")
    second_path, second_size = _file(tmp_path, make_instance(), "second.dcm")
    rest.store_instance(session, _target(orthanc), first_path, first_size)

    # The client keeps its connection to the Orthanc that is stopped here.
    orthanc.stop()
    orthanc.start()
    second = rest.store_instance(session, _target(orthanc), second_path, second_size)

    assert second.status == "Success"


class _UnreadableFile(io.BytesIO):
    """A file that opens but whose reads fail, as on a share that drops during a send."""

    def read(self, amount=-1):
        raise PermissionError(13, "Permission denied")


def test_rest_unreadable_body_raises_os_error(orthanc, session, tmp_path, monkeypatch):
    path, size = _file(tmp_path, make_instance())
    monkeypatch.setattr(rest, "open", lambda *args: _UnreadableFile(), raising=False)

    with pytest.raises(PermissionError):
        rest.store_instance(session, _target(orthanc), path, size)


def test_rest_client_usable_after_unreadable_body(orthanc, session, tmp_path, monkeypatch):
    path, size = _file(tmp_path, make_instance())
    with monkeypatch.context() as patch:
        patch.setattr(rest, "open", lambda *args: _UnreadableFile(), raising=False)
        with pytest.raises(PermissionError):
            rest.store_instance(session, _target(orthanc), path, size)

    assert rest.store_instance(session, _target(orthanc), path, size).status in ("Success", "AlreadyStored")
