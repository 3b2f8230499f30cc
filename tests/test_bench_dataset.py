"""Unit tests of bench.dataset: scanner-sized images from pydicom's files, fresh UIDs, Orthanc identifiers."""

from __future__ import annotations

import sys
from pathlib import Path

import pydicom
import pytest

# bench/ is a top-level package of the checkout, not part of the installed dicomfleet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import dataset  # noqa: E402


def test_enlarge_pixels_repeats_blocks():
    # A 2 x 2 image of 1-byte pixels a b / c d, enlarged 2 x 3.
    enlarged = dataset.enlarge_pixels(b"abcd", 2, 2, 2, 3, bytes_per_pixel=1)
    assert enlarged == b"aaabbb" * 2 + b"cccddd" * 2


def test_enlarge_pixels_two_byte_pixels():
    enlarged = dataset.enlarge_pixels(b"\x01\x00\x02\x00", 1, 2, 1, 2)
    assert enlarged == b"\x01\x00\x01\x00\x02\x00\x02\x00"


def test_enlarge_pixels_short_data_raises():
    with pytest.raises(ValueError, match="contains 6 bytes, fewer than the 8 bytes"):
        dataset.enlarge_pixels(b"\x00" * 6, 2, 2, 1, 1)


@pytest.mark.parametrize("kind, rows, columns", [("CT", 512, 512), ("CT128", 128, 128), ("MR", 256, 256),
                                                 ("CR", 2048, 1536)])
def test_load_template_scanner_size(kind, rows, columns):
    template = dataset.load_template(kind)
    assert (template.Rows, template.Columns) == (rows, columns)
    assert len(template.PixelData) == rows * columns * 2


def test_load_template_unknown_kind_raises():
    with pytest.raises(ValueError, match="Unknown image kind 'US'"):
        dataset.load_template("US")


def test_write_ct_slices_series_per_study(tmp_path):
    written = dataset.write_ct_slices(tmp_path, 5, slices_per_series=2)
    studies = [item.study_uid for item in written]
    series = [item.series_uid for item in written]
    assert len(written) == 5
    assert len(set(studies)) == 3
    assert len(set(series)) == 3
    assert len({item.sop_uid for item in written}) == 5


def test_write_ct_slices_valid_dicom(tmp_path):
    (written,) = dataset.write_ct_slices(tmp_path, 1)
    parsed = pydicom.dcmread(written.path)
    assert parsed.SOPInstanceUID == written.sop_uid
    assert parsed.file_meta.MediaStorageSOPInstanceUID == written.sop_uid
    assert parsed.pixel_array.shape == (512, 512)


def test_write_ct_slices_size_near_512_kib(tmp_path):
    (written,) = dataset.write_ct_slices(tmp_path, 1)
    assert 512 * 1024 <= written.size < 540 * 1024


def test_encode_series_splits_series():
    encoded = dataset.SeriesWriter("MR").encode_series(6, series_per_study=2)
    series = [identifiers.series_uid for _, identifiers in encoded]
    assert len(set(series)) == 2
    assert series[:3] == [series[0]] * 3


def test_orthanc_instance_id_matches_orthanc():
    # Orthanc 1.10.1 returned this ID for pydicom's CT_small.dcm.
    identifier = dataset.orthanc_instance_id(
        "1CT1", "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322",
        "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322",
        "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322")
    assert identifier == "f689ddd2-662f8fe1-8b18180d-ec2a2cee-937917af"


def test_write_large_instance_frames(tmp_path):
    frame = 512 * 512 * 2
    written = dataset.write_large_instance(tmp_path / "large.dcm", 3 * frame + 100)
    parsed = pydicom.dcmread(written.path)
    assert parsed.NumberOfFrames == 3
    assert len(parsed.PixelData) == 3 * frame
    assert parsed.SOPInstanceUID == written.sop_uid
