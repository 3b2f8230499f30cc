"""Tests of how the sync names a study's source machine from Orthanc's instance metadata.

The metadata dictionaries have the shape Orthanc 1.10.1 returns from
``/instances/{id}/metadata?expand``; the end-to-end cases are in test_sync_feed.
"""

from __future__ import annotations

import pytest

from dicomfleet.sync.config import MachineEntry
from dicomfleet.sync.provenance import (
    BY_AE_TITLE_AND_IP,
    BY_HTTP_USERNAME,
    BY_SOURCE_MACHINE,
    MachineDirectory,
)


@pytest.fixture
def directory():
    return MachineDirectory([
        MachineEntry(id="ct1", ae_title="CT_ROOM1", address="127.0.10.11", modality="CT", username="ct1"),
        MachineEntry(id="mr1", ae_title="MR_ROOM1", address="127.0.10.12", modality="MR", username="mr1"),
        MachineEntry(id="us1", ae_title="US_CART", address="us-cart.example.org", modality="US", username="us1"),
    ])


def rest_upload(username, source_machine=None, ip="127.0.10.11"):
    metadata = {"HttpUsername": username, "Origin": "RestApi", "RemoteAET": "", "RemoteIP": ip,
                "ReceptionDate": "20261204T200230"}
    if source_machine is not None:
        metadata["SourceMachine"] = source_machine
    return metadata


def cstore(aet, ip):
    return {"CalledAET": "ORTHANC", "Origin": "DicomProtocol", "RemoteAET": aet, "RemoteIP": ip,
            "ReceptionDate": "20261204T200230"}


def test_resolve_source_machine_metadata_first(directory):
    source = directory.resolve(rest_upload("mr1", source_machine="ct1"))

    assert source.machine_id == "ct1"
    assert source.method == BY_SOURCE_MACHINE


def test_resolve_unconfigured_source_machine_kept(directory):
    source = directory.resolve(rest_upload("ct1", source_machine="ct9"))

    assert source.machine_id == "ct9"


def test_resolve_http_username(directory):
    source = directory.resolve(rest_upload("mr1"))

    assert source.machine_id == "mr1"
    assert source.method == BY_HTTP_USERNAME


def test_resolve_ae_title_and_ip(directory):
    source = directory.resolve(cstore("mr_room1", "127.0.10.12"))

    assert source.machine_id == "mr1"
    assert source.method == BY_AE_TITLE_AND_IP


def test_resolve_ae_title_from_other_ip_unknown(directory):
    source = directory.resolve(cstore("MR_ROOM1", "127.0.10.99"))

    assert source.machine_id is None


def test_resolve_host_name_address_matches_ae_title(directory):
    source = directory.resolve(cstore("US_CART", "127.0.10.20"))

    assert source.machine_id == "us1"


def test_resolve_unknown_user_and_ae_title(directory):
    source = directory.resolve(rest_upload("dicomfleet-admin", ip="127.0.0.1"))

    assert source.machine_id is None
    assert source.method is None
    assert source.http_username == "dicomfleet-admin"


def test_summarize_main_machine_sent_most(directory):
    sources = [directory.resolve(rest_upload("mr1", ip="127.0.10.12"))]
    sources += [directory.resolve(rest_upload("ct1")) for _ in range(3)]

    summary = directory.summarize(sources)

    assert summary.machine_id == "ct1"
    assert summary.machine_ids == ["mr1", "ct1"]
    assert summary.ae_title == "CT_ROOM1"
    assert summary.ip == "127.0.10.11"
    assert summary.modality == "CT"
    assert summary.unknown_instances == 0


def test_summarize_tie_goes_to_first_received(directory):
    sources = [directory.resolve(rest_upload("mr1", ip="127.0.10.12")), directory.resolve(rest_upload("ct1"))]

    summary = directory.summarize(sources)

    assert summary.machine_id == "mr1"


def test_summarize_unknown_only(directory):
    sources = [directory.resolve(cstore("OTHER_AE", "127.0.0.5")), directory.resolve(cstore("OTHER_AE", "127.0.0.5"))]

    summary = directory.summarize(sources)

    assert summary.machine_id is None
    assert summary.machine_ids == []
    assert summary.ae_title == "OTHER_AE"
    assert summary.ip == "127.0.0.5"
    assert summary.modality is None
    assert summary.unknown_instances == 2


def test_summarize_no_instances(directory):
    summary = directory.summarize([])

    assert summary.machine_id is None
    assert summary.ae_title is None
    assert summary.ip is None
