"""Unit tests of the quarantine: files keep their relative path, get a reason note, and are never overwritten."""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile

import pytest

from dicomfleet.agent.quarantine import quarantine_file

MOMENT = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)


@pytest.fixture
def folders(tmp_path):
    watch = tmp_path / "export"
    quarantine = tmp_path / "quarantine"
    watch.mkdir()
    return watch, quarantine


def test_quarantine_keeps_relative_path_and_writes_reason(folders):
    watch, quarantine = folders
    source = watch / "study 1" / "bad.dcm"
    source.parent.mkdir()
    source.write_bytes(b"not dicom")

    destination = quarantine_file(quarantine, "ct1", str(watch), str(source), "not a DICOM file", now=MOMENT)

    assert destination == quarantine / "ct1" / "study 1" / "bad.dcm"
    assert destination.read_bytes() == b"not dicom"
    assert not source.exists()
    note = (quarantine / "ct1" / "study 1" / "bad.dcm.reason.txt").read_text(encoding="utf-8")
    assert note == (
        "reason: not a DICOM file\n"
        "time: 2024-05-06T07:08:09+00:00\n"
        "machine: ct1\n"
        f"original path: {source}\n"
    )


def test_quarantine_adds_suffix_on_name_clash(folders):
    watch, quarantine = folders
    for number in range(3):
        source = watch / "same.dcm"
        source.write_bytes(f"version {number}".encode())
        quarantine_file(quarantine, "ct1", str(watch), str(source), f"reason {number}", now=MOMENT)

    folder = quarantine / "ct1"
    assert (folder / "same.dcm").read_bytes() == b"version 0"
    assert (folder / "same.dcm.1").read_bytes() == b"version 1"
    assert (folder / "same.dcm.2").read_bytes() == b"version 2"
    assert "reason 2" in (folder / "same.dcm.2.reason.txt").read_text(encoding="utf-8")


def test_quarantine_handles_non_utf8_name(folders):
    watch, quarantine = folders
    source = watch / os.fsdecode(b"caf\xe9.dcm")
    source.write_bytes(b"x")

    destination = quarantine_file(quarantine, "ct1", str(watch), str(source), "truncated", now=MOMENT)

    assert destination.read_bytes() == b"x"
    note = destination.with_name(destination.name + ".reason.txt").read_text(encoding="utf-8")
    assert "caf\\xe9.dcm" in note


def test_quarantine_missing_file_raises(folders):
    watch, quarantine = folders

    with pytest.raises(FileNotFoundError):
        quarantine_file(quarantine, "ct1", str(watch), str(watch / "gone.dcm"), "truncated", now=MOMENT)

    assert list((quarantine / "ct1").iterdir()) == []


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm as a second file system")
def test_quarantine_copies_across_file_systems(tmp_path):
    watch = tempfile.mkdtemp(dir="/dev/shm")
    try:
        if os.stat(watch).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same file system as the test folder")
        source = os.path.join(watch, "bad.dcm")
        with open(source, "wb") as handle:
            handle.write(b"across")

        destination = quarantine_file(tmp_path / "quarantine", "ct1", watch, source, "truncated", now=MOMENT)

        assert destination.read_bytes() == b"across"
        assert not os.path.exists(source)
        assert [p.name for p in destination.parent.iterdir() if p.name.startswith(".")] == []
    finally:
        shutil.rmtree(watch)
