"""Inventory validation: every rule rejects bad input with a message naming file, host and field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from dicomfleet.inventory import InventoryError, load_site

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "inventory" / "lab.yml"
EXAMPLE = ROOT / "inventory" / "example-hospital.yml"


def _lab_document() -> dict:
    return yaml.safe_load(LAB.read_text())


def _write(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / "site.yml"
    path.write_text(yaml.safe_dump(document))
    return path


def _problems(tmp_path: Path, document: dict) -> list[str]:
    with pytest.raises(InventoryError) as caught:
        load_site(_write(tmp_path, document))
    return caught.value.problems


def _scanner(document: dict, host: str) -> dict:
    return document["all"]["children"]["scanners"]["hosts"][host]


@pytest.mark.parametrize("path", [LAB, EXAMPLE], ids=["lab", "example-hospital"])
def test_shipped_inventory_valid(path):
    site = load_site(path)
    assert len(site.machines) >= 3


def test_example_hospital_machines():
    site = load_site(EXAMPLE)
    assert sorted(site.machines) == ["ct-room1", "ct-room2", "mri1", "xr-room1", "xr-room2"]


def test_example_hospital_documentation_addresses():
    site = load_site(EXAMPLE)
    for machine in site.machines.values():
        assert machine.address.startswith(("192.0.2.", "198.51.100.")), machine.host


def test_duplicate_ae_title_rejected(tmp_path):
    document = _lab_document()
    _scanner(document, "mr1")["dicomfleet_ae_title"] = "ct_room1"
    problems = _problems(tmp_path, document)
    assert len(problems) == 1
    assert "site.yml: host mr1: dicomfleet_ae_title:" in problems[0]
    assert "already used by host ct1" in problems[0]


def test_long_ae_title_rejected(tmp_path):
    document = _lab_document()
    _scanner(document, "ct1")["dicomfleet_ae_title"] = "CT_ROOM_ONE_NORTH"
    problems = _problems(tmp_path, document)
    assert problems == [
        f"{tmp_path / 'site.yml'}: host ct1: dicomfleet_ae_title: 'CT_ROOM_ONE_NORTH' is 17 "
        "characters long, over the maximum of 16 (the machine's DICOM AE title)."
    ]


@pytest.mark.parametrize("title, reason", [
    ("CT\\1", "contains a backslash"),
    ("CT\t1", "outside the DICOM default repertoire"),
    ("   ", "is empty"),
    ("CTÖ1", "outside the DICOM default repertoire"),
])
def test_bad_ae_title_characters_rejected(tmp_path, title, reason):
    document = _lab_document()
    _scanner(document, "ct1")["dicomfleet_ae_title"] = title
    problems = _problems(tmp_path, document)
    assert reason in problems[0]


def test_missing_watch_folder_rejected(tmp_path):
    document = _lab_document()
    del _scanner(document, "xr1")["dicomfleet_watch_folders"]
    problems = _problems(tmp_path, document)
    assert len(problems) == 1
    assert "host xr1: dicomfleet_watch_folders: missing" in problems[0]


def test_relative_watch_folder_rejected(tmp_path):
    document = _lab_document()
    _scanner(document, "xr1")["dicomfleet_watch_folders"] = ["export"]
    problems = _problems(tmp_path, document)
    assert "'export', which is not an absolute path" in problems[0]


def test_unknown_ingest_path_rejected(tmp_path):
    document = _lab_document()
    _scanner(document, "ct1")["dicomfleet_ingest"] = "ftp"
    problems = _problems(tmp_path, document)
    assert len(problems) == 1
    assert "host ct1: dicomfleet_ingest: 'ftp' is not one of agent, share, dicom" in problems[0]


def test_duplicate_machine_id_rejected(tmp_path):
    document = _lab_document()
    _scanner(document, "mr1")["dicomfleet_machine_id"] = "ct1"
    problems = _problems(tmp_path, document)
    assert "host mr1: dicomfleet_machine_id: 'ct1' is already used by host ct1" in problems[0]


def test_unknown_variable_suggests_name(tmp_path):
    document = _lab_document()
    _scanner(document, "ct1")["dicomfleet_watch_folder"] = ["/srv/x"]
    problems = _problems(tmp_path, document)
    assert "did you mean dicomfleet_watch_folders?" in problems[0]


def test_port_out_of_range_rejected(tmp_path):
    document = _lab_document()
    document["all"]["children"]["central"]["hosts"]["central"]["dicomfleet_orthanc_http_port"] = 70000
    problems = _problems(tmp_path, document)
    assert "host central: dicomfleet_orthanc_http_port: 70000 is outside the TCP port range" in problems[0]


def test_invalid_address_rejected(tmp_path):
    document = _lab_document()
    _scanner(document, "ct1")["ansible_host"] = "127.0.10.300"
    problems = _problems(tmp_path, document)
    assert "host ct1: ansible_host: '127.0.10.300' looks like an IPv4 address but is not a valid one" in problems[0]


def test_unknown_orthanc_target_rejected(tmp_path):
    document = _lab_document()
    _scanner(document, "ct1")["dicomfleet_orthanc"] = "pacs9"
    problems = _problems(tmp_path, document)
    assert "host ct1: dicomfleet_orthanc: 'pacs9' is not a host of the group 'central'" in problems[0]


def test_two_central_hosts_need_target(tmp_path):
    document = _lab_document()
    central = document["all"]["children"]["central"]["hosts"]
    central["central2"] = copy.deepcopy(central["central"])
    central["central2"]["ansible_host"] = "127.0.10.2"
    central["central2"]["dicomfleet_orthanc_aet"] = "ORTHANC2"
    problems = _problems(tmp_path, document)
    assert len(problems) == 3
    assert all("dicomfleet_orthanc: missing; the inventory has several central hosts" in p for p in problems)


def test_no_central_host_rejected(tmp_path):
    document = _lab_document()
    del document["all"]["children"]["central"]
    problems = _problems(tmp_path, document)
    assert any("no host in the group 'central'" in p for p in problems)


def test_missing_required_field_rejected(tmp_path):
    document = _lab_document()
    del _scanner(document, "mr1")["dicomfleet_modality"]
    problems = _problems(tmp_path, document)
    assert "host mr1: dicomfleet_modality: missing" in problems[0]


def test_unknown_modality_rejected(tmp_path):
    document = _lab_document()
    _scanner(document, "mr1")["dicomfleet_modality"] = "MRI"
    problems = _problems(tmp_path, document)
    assert "'MRI' is not a DICOM modality defined term" in problems[0]


def test_orthanc_aet_clash_rejected(tmp_path):
    document = _lab_document()
    document["all"]["children"]["central"]["hosts"]["central"]["dicomfleet_orthanc_aet"] = "CT_ROOM1"
    problems = _problems(tmp_path, document)
    assert "host central: dicomfleet_orthanc_aet: 'CT_ROOM1' is also the AE title of host ct1" in problems[0]


def test_every_problem_reported_at_once(tmp_path):
    document = _lab_document()
    _scanner(document, "ct1")["dicomfleet_ae_title"] = "A" * 20
    _scanner(document, "mr1")["dicomfleet_ingest"] = "usb"
    del _scanner(document, "xr1")["dicomfleet_watch_folders"]
    problems = _problems(tmp_path, document)
    assert len(problems) == 3


def test_yaml_syntax_error_named(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("all:\n  hosts: [\n")
    with pytest.raises(InventoryError) as caught:
        load_site(path)
    assert str(path) in caught.value.problems[0]


def test_missing_file_named(tmp_path):
    path = tmp_path / "absent.yml"
    with pytest.raises(InventoryError) as caught:
        load_site(path)
    assert caught.value.problems[0] == f"{path}: cannot read the inventory: No such file or directory."


def test_every_variable_documented():
    from dicomfleet.validation import SCHEMA

    documentation = (ROOT / "docs" / "inventory.md").read_text()
    missing = [name for name in SCHEMA if f"`{name}`" not in documentation]
    assert missing == []
