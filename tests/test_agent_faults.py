"""Hard fault tests of the agent against a real Orthanc: slow writers, a 2 GB file, and kill -9 mid-backlog.

The agent runs as a subprocess; every check reads Orthanc's REST API, the agent's
spool and /proc, never the agent's internals.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from agent_support import AgentSite, make_instance, md5, sop_instance_uid, wait_until

# Multi-frame Grayscale Word Secondary Capture Image Storage (PS3.4 B.5).
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
LARGE_ROWS = 1000
LARGE_COLUMNS = 1000
LARGE_FRAMES = 1000
# 2,000,000,000 bytes of 16-bit pixels: 2 GB, below the 2 GiB that a signed 32-bit length would overflow at.
LARGE_PIXEL_BYTES = LARGE_ROWS * LARGE_COLUMNS * LARGE_FRAMES * 2
# The test's bound on the agent's peak resident memory (VmHWM) while it sends the 2 GB file.
MAX_AGENT_PEAK_RSS_KB = 150 * 1024
BACKLOG_FILES = 1000
KILLS = 3


@pytest.fixture(scope="module")
def fault_site(tmp_path_factory):
    site = AgentSite(tmp_path_factory.mktemp("agent-faults"), {"dicomfleet_agent_rescan_interval_s": 2})
    site.orthanc.start()
    yield site
    site.stop_all()


@pytest.fixture
def site(fault_site):
    fault_site.reset()
    yield fault_site
    fault_site.stop_agents()


def test_slow_writer_file_sent_once_complete(site):
    agent = site.start_agent()
    data = make_instance()
    path = site.watch / "slow.dcm"
    chunks = 10
    step = len(data) // chunks + 1

    # The writer appends one chunk a second and closes the file in between, as a copy
    # over a slow link does; every close is an inotify close-write event.
    for start in range(0, len(data), step):
        with open(path, "ab") as handle:
            handle.write(data[start:start + step])
        time.sleep(1.0)

    uid = sop_instance_uid(data)
    stored = site.wait_stored([uid], timeout=30)
    agent.wait_for_log("Stored file")
    time.sleep(1.0)

    assert site.statistics()["CountInstances"] == 1
    assert site.stored_md5(stored[uid]) == md5(data)
    assert site.quarantined() == []
    assert [row["state"] for row in site.spool_rows()] == ["sent"]


def _write_large_instance(path: Path) -> str:
    """Write a valid 2 GB DICOM file of zero pixels, sparse on disk; return its SOP Instance UID."""
    dataset = pydicom.Dataset()
    dataset.SOPClassUID = MULTIFRAME_WORD_SC
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.PatientID = "LARGE-1"
    dataset.PatientName = "Large^File"
    dataset.Modality = "OT"
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.NumberOfFrames = LARGE_FRAMES
    dataset.Rows = LARGE_ROWS
    dataset.Columns = LARGE_COLUMNS
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = MULTIFRAME_WORD_SC
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    header = io.BytesIO()
    dataset.save_as(header, enforce_file_format=True)
    # Pixel Data (7FE0,0010), VR OW, two reserved bytes, 32-bit length; the value is a hole of zeros.
    element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, LARGE_PIXEL_BYTES)
    with open(path, "wb") as handle:
        handle.write(header.getvalue() + element)
        handle.truncate(len(header.getvalue()) + len(element) + LARGE_PIXEL_BYTES)
    return str(dataset.SOPInstanceUID)


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


@pytest.mark.slow
def test_large_file_sent_with_low_memory(site):
    staging = site.folder / "staging"
    staging.mkdir(exist_ok=True)
    staged = staging / "large.dcm"
    target = site.watch / "large.dcm"
    instance = None
    try:
        uid = _write_large_instance(staged)
        expected_md5 = _file_md5(staged)
        agent = site.start_agent()
        os.rename(staged, target)

        # Orthanc's REST API can stall for over 10 s while it stores 2 GB, so the test waits
        # for the agent's log line, written once Orthanc returned the instance, before asking Orthanc.
        agent.wait_for_log("Stored file", timeout=300)
        instance = site.instance_of(uid)

        peak_rss_kb = _peak_rss_kb(agent.process.pid)
        print(f"agent peak RSS (VmHWM) while sending a 2 GB file: {peak_rss_kb} kB")
        assert peak_rss_kb < MAX_AGENT_PEAK_RSS_KB
        assert instance is not None
        assert site.stored_md5(instance) == expected_md5
        assert site.quarantined() == []
    finally:
        site.stop_agents()
        staged.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        if instance is not None:
            requests.delete(f"{site.orthanc.url}/instances/{instance}", auth=site.orthanc.admin_auth, timeout=120)


def test_kill_during_backlog_stores_each_once(site):
    template = make_instance()
    template_uid = sop_instance_uid(template)
    chooser = random.Random()
    files: list[str] = []
    for number in range(BACKLOG_FILES):
        data = _with_new_sop_uid(template, template_uid, chooser)
        path = site.watch / f"series-{number // 100}" / f"slice-{number:04d}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        files.append(str(path))

    # Kill the agent at random moments while it works through the backlog.
    kills = 0
    while kills < KILLS:
        agent = site.start_agent(log_level="INFO")
        time.sleep(chooser.uniform(0.3, 2.0))
        agent.kill()
        kills += 1
        if site.statistics()["CountInstances"] >= BACKLOG_FILES:
            break

    agent = site.start_agent(log_level="INFO")
    wait_until(lambda: site.statistics()["CountInstances"] >= BACKLOG_FILES, 120, interval=0.5,
               message=f"{BACKLOG_FILES} instances in Orthanc")

    def all_sent() -> list[dict] | None:
        rows = site.spool_rows()
        if len(rows) >= BACKLOG_FILES and all(row["state"] == "sent" for row in rows):
            return rows
        return None

    rows = wait_until(all_sent, 30, interval=0.2, message="every spool record sent")

    assert site.statistics()["CountInstances"] == BACKLOG_FILES
    assert len(rows) == BACKLOG_FILES
    assert sorted(row["path"] for row in rows) == sorted(files)
    assert site.quarantined() == []
    assert kills >= 1


def _with_new_sop_uid(template: bytes, old_uid: str, chooser: random.Random) -> bytes:
    """Return TEMPLATE with a new SOP Instance UID of the same length, so no element length changes.

    Building 1,000 files this way takes well under a second; encoding each with pydicom takes many.
    """
    prefix = "1.2.826.0.1.3680043.8.498."
    assert old_uid.startswith(prefix)
    digits = len(old_uid) - len(prefix)
    new_uid = prefix + str(chooser.randrange(10 ** (digits - 1), 10 ** digits))
    return template.replace(old_uid.encode("ascii"), new_uid.encode("ascii"))
