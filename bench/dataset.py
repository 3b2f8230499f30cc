"""Make the benchmark's DICOM files from the real images in pydicom's test files.

Each image is enlarged to a scanner's size by repeating pixels, so the files keep real
attributes and real anatomy. Every written file gets fresh study, series and SOP Instance UIDs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import struct
from pathlib import Path

import pydicom
import pydicom.data
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"

PIXEL_DATA_TAG = 0x7FE00010

# Scanner-sized images made from pydicom's test files:
# name -> (source file, rows, columns, modality).
IMAGE_KINDS = {
    # A CT slice: 512 x 512, 16 bits, 512 KiB of pixel data.
    "CT": ("CT_small.dcm", 512, 512, "CT"),
    # pydicom's CT slice at its own size, 128 x 128, for benchmarks that need many small studies.
    "CT128": ("CT_small.dcm", 128, 128, "CT"),
    # An MR slice: 256 x 256, 16 bits, 128 KiB of pixel data.
    "MR": ("MR_small.dcm", 256, 256, "MR"),
    # A computed radiography image: 2048 x 1536, 16 bits, 6 MiB of pixel data.
    "CR": ("dicomdirtests/77654033/CR1/6154", 2048, 1536, "CR"),
}


def enlarge_pixels(pixels: bytes, rows: int, columns: int, row_factor: int, column_factor: int,
                   bytes_per_pixel: int = 2) -> bytes:
    """Return PIXELS (ROWS x COLUMNS, row-major) with each pixel repeated into a block.

    Each source pixel becomes ROW_FACTOR x COLUMN_FACTOR identical pixels, so a
    128 x 128 image with factors 4 and 4 becomes 512 x 512.
    """
    expected = rows * columns * bytes_per_pixel
    if len(pixels) < expected:
        raise ValueError(f"The pixel data contains {len(pixels)} bytes, fewer than the {expected} bytes "
                         f"of a {rows} x {columns} image with {bytes_per_pixel} bytes per pixel.")

    row_length = columns * bytes_per_pixel
    enlarged_rows = []
    for row in range(rows):
        source = pixels[row * row_length:(row + 1) * row_length]
        wide = b"".join(source[i:i + bytes_per_pixel] * column_factor
                        for i in range(0, row_length, bytes_per_pixel))
        enlarged_rows.append(wide * row_factor)
    return b"".join(enlarged_rows)


def load_template(kind: str) -> Dataset:
    """Return the pydicom test image of KIND enlarged to its scanner size, ready to copy."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"Unknown image kind {kind!r}; use one of {', '.join(IMAGE_KINDS)}.")
    source_name, rows, columns, modality = IMAGE_KINDS[kind]
    dataset = pydicom.dcmread(TEST_FILES / source_name)

    if rows % dataset.Rows or columns % dataset.Columns:
        raise ValueError(f"{source_name} is {dataset.Rows} x {dataset.Columns}, which does not divide "
                         f"{rows} x {columns}.")
    dataset.PixelData = enlarge_pixels(dataset.PixelData, dataset.Rows, dataset.Columns,
                                       rows // dataset.Rows, columns // dataset.Columns)
    dataset.Rows = rows
    dataset.Columns = columns
    dataset.Modality = modality

    # Elements after Pixel Data (trailing padding) would not belong to an enlarged image.
    for element in list(dataset):
        if element.tag > PIXEL_DATA_TAG:
            del dataset[element.tag]

    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset


@dataclasses.dataclass(frozen=True)
class WrittenFile:
    """A DICOM file the benchmark wrote, with the identifiers Orthanc derives from it."""

    path: Path
    size: int
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str

    @property
    def orthanc_id(self) -> str:
        """The Orthanc identifier of this instance."""
        return orthanc_instance_id(self.patient_id, self.study_uid, self.series_uid, self.sop_uid)


def orthanc_instance_id(patient_id: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Return the identifier Orthanc gives an instance: the SHA-1 of its four keys, in five groups of 8.

    Orthanc 1.10 hashes "PatientID|StudyInstanceUID|SeriesInstanceUID|SOPInstanceUID"
    (Orthanc's DicomInstanceHasher).
    """
    digest = hashlib.sha1(f"{patient_id}|{study_uid}|{series_uid}|{sop_uid}".encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


class SeriesWriter:
    """Writes the images of one kind as a scanner does: studies of series of numbered instances."""

    def __init__(self, kind: str, patient_prefix: str = "BENCH"):
        self.template = load_template(kind)
        self.kind = kind
        self.patient_prefix = patient_prefix
        self.studies_written = 0

    def encode_series(self, instances: int, series_per_study: int = 1) -> list[tuple[bytes, WrittenFile]]:
        """Return one new study of SERIES_PER_STUDY series holding INSTANCES images in all, encoded.

        Each element pairs the file's bytes with its identifiers (the path is left empty).
        """
        self.studies_written += 1
        dataset = self.template
        patient_id = f"{self.patient_prefix}{self.studies_written:05d}"
        study_uid = generate_uid()
        dataset.PatientID = patient_id
        dataset.PatientName = f"{self.patient_prefix}^{self.kind}{self.studies_written:05d}"
        dataset.StudyInstanceUID = study_uid
        dataset.StudyID = str(self.studies_written)

        encoded = []
        series_uid = ""
        per_series = max(1, -(-instances // series_per_study))
        for number in range(instances):
            if number % per_series == 0:
                series_uid = generate_uid()
                dataset.SeriesInstanceUID = series_uid
                dataset.SeriesNumber = number // per_series + 1
            sop_uid = generate_uid()
            dataset.SOPInstanceUID = sop_uid
            dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
            dataset.InstanceNumber = number % per_series + 1
            if "ImagePositionPatient" in dataset:
                position = list(dataset.ImagePositionPatient)
                position[2] = -1.0 * (number % per_series)
                dataset.ImagePositionPatient = position
                dataset.SliceLocation = position[2]

            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
            encoded.append((data, WrittenFile(Path(), len(data), patient_id, study_uid, series_uid, sop_uid)))
        return encoded


def write_ct_slices(folder: Path, count: int, slices_per_series: int = 100) -> list[WrittenFile]:
    """Write COUNT CT slices of 512 KiB into FOLDER: one series per study, SLICES_PER_SERIES slices each."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = SeriesWriter("CT")
    written: list[WrittenFile] = []
    while len(written) < count:
        size = min(slices_per_series, count - len(written))
        for data, identifiers in writer.encode_series(size):
            path = folder / f"ct_{writer.studies_written:03d}_{identifiers.sop_uid[-12:]}.dcm"
            path.write_bytes(data)
            written.append(dataclasses.replace(identifiers, path=path))
    return written


def write_large_instance(path: Path, target_bytes: int) -> WrittenFile:
    """Write a multi-frame CT of about TARGET_BYTES to PATH, streaming its pixel data to disk.

    The frames repeat the 512 x 512 CT slice. The Pixel Data element is written by
    hand after the rest of the dataset, so memory use stays near one frame.
    """
    template = load_template("CT")
    frame = bytes(template.PixelData)
    frames = max(1, target_bytes // len(frame))
    pixel_bytes = frames * len(frame)
    if pixel_bytes >= 0xFFFFFFFF:
        raise ValueError(f"{pixel_bytes} bytes of pixel data do not fit one DICOM element "
                         "(the maximum is 4 GiB minus 2 bytes); ask for a smaller file.")

    dataset = copy.deepcopy(template)
    del dataset.PixelData
    dataset.NumberOfFrames = frames
    patient_id = "BENCHLARGE"
    dataset.PatientID = patient_id
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)

    # Pixel Data (7FE0,0010), explicit VR little endian: tag, "OW", two reserved bytes, 32-bit length.
    header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())
        handle.write(header)
        chunk = frame * 64
        remaining = pixel_bytes
        while remaining:
            piece = chunk[:remaining]
            handle.write(piece)
            remaining -= len(piece)

    return WrittenFile(path, path.stat().st_size, patient_id, str(dataset.StudyInstanceUID),
                       str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))
