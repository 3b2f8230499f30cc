"""Decide whether a file is a complete DICOM instance that Orthanc will accept.

The check walks the element headers of the file (DICOM PS3.10 file format or a
bare PS3.5 data set) without loading values, so it needs little memory for any size.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zlib

PREAMBLE_LENGTH = 128
PREFIX = b"DICM"
MIN_PART10_LENGTH = PREAMBLE_LENGTH + len(PREFIX)

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

# Value Representations of PS3.5 table 6.2-1.
KNOWN_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV "
    b"TM UC UI UL UN UR US UT UV".split()
)
# VRs whose explicit encoding has two reserved bytes and a 32-bit length (PS3.5 7.1.2).
LONG_LENGTH_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
SHORT_LENGTH_VRS = KNOWN_VRS - LONG_LENGTH_VRS

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = (0xFFFE, 0xE000)
ITEM_DELIMITATION = (0xFFFE, 0xE00D)
SEQUENCE_DELIMITATION = (0xFFFE, 0xE0DD)
TRANSFER_SYNTAX_UID = (0x0002, 0x0010)

# Orthanc 1.10.1 responds to POST /instances with 404 "Inexistent tag" when one of
# these is missing, because it derives the instance's ID from them.
REQUIRED_UIDS = {
    (0x0008, 0x0018): "SOP Instance UID (0008,0018)",
    (0x0020, 0x000D): "Study Instance UID (0020,000D)",
    (0x0020, 0x000E): "Series Instance UID (0020,000E)",
}
# Patient ID, which Orthanc hashes with the UIDs above into an instance's ID.
PATIENT_ID = (0x0010, 0x0020)
# Elements whose values the check reads. It skips every other value.
READ_TAGS = frozenset(REQUIRED_UIDS) | {PATIENT_ID}
# Pixel Data, Float Pixel Data and Double Float Pixel Data (PS3.3 C.7.6.3).
PIXEL_DATA_TAGS = frozenset({(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)})
# UIDs are at most 64 characters (PS3.5 9.1); longer values are not read into memory.
# Elements the top-level walk of a file hands to _DatasetWalker._step.
STEPPED_TAGS = READ_TAGS | PIXEL_DATA_TAGS
FILE_WINDOW = 64 * 1024
MAX_READ_UID_LENGTH = 1024
MAX_SEQUENCE_DEPTH = 32
DEFLATE_CHUNK = 64 * 1024


class DicomFileError(Exception):
    """Raised inside the check when the file is not a complete DICOM instance."""


class TruncatedError(DicomFileError):
    """Raised inside the check when the file ends too early, possibly because it is still being written."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The result of checking one file: valid or not, why not, and the instance's UIDs."""

    valid: bool
    reason: str = ""
    # True when more bytes could change the verdict: the file is empty, truncated, or has no
    # pixel data yet. The agent then waits until the file stays unchanged before acting on it.
    may_grow: bool = False
    transfer_syntax: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    # The Patient ID as Orthanc hashes it, "" when the element is missing. None when the check cannot
    # tell, because the value has VR UN, non-ASCII bytes that depend on the character set, or over 1024 bytes.
    patient_id: str | None = None


def _tag_text(tag: tuple[int, int]) -> str:
    return f"({tag[0]:04X},{tag[1]:04X})"


def _subject(description: str, tag: tuple[int, int] | None) -> str:
    # Messages are built only on failure, because the check reads thousands of headers per file.
    if tag is None:
        return description
    return f"{description} {_tag_text(tag)}"


class _FileReader:
    """A sequential reader over an open file of known size."""

    def __init__(self, handle, size: int):
        self.handle = handle
        self.size = size
        self.offset = handle.tell()

    def read(self, count: int, description: str, tag: tuple[int, int] | None = None) -> bytes:
        data = self.handle.read(count)
        if len(data) < count:
            raise TruncatedError(f"truncated: the file ends at byte {self.size} inside "
                                 f"{_subject(description, tag)} that starts at byte {self.offset}")
        self.offset += count
        return data

    def skip(self, count: int, description: str, tag: tuple[int, int] | None = None) -> None:
        if self.offset + count > self.size:
            raise TruncatedError(
                f"truncated: {_subject(description, tag)} at byte {self.offset} declares {count} bytes, "
                f"but the file ends {self.size - self.offset} bytes later")
        self.handle.seek(count, os.SEEK_CUR)
        self.offset += count

    def at_end(self) -> bool:
        return self.offset >= self.size


class _DeflateReader:
    """A sequential reader over the inflated data set of a Deflated Explicit VR Little Endian file."""

    def __init__(self, handle):
        self.handle = handle
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        # Inflated bytes not read yet are self.buffer[self.position:].
        self.buffer = bytearray()
        self.position = 0
        self.offset = 0
        self.input_exhausted = False

    def _available(self) -> int:
        return len(self.buffer) - self.position

    def _fill(self, needed: int) -> None:
        """Inflate until NEEDED bytes are buffered or the stream ends."""
        if self.position > DEFLATE_CHUNK:
            del self.buffer[: self.position]
            self.position = 0

        while self._available() < needed and not self.inflater.eof:
            if self.inflater.unconsumed_tail:
                compressed = self.inflater.unconsumed_tail
            else:
                compressed = self.handle.read(DEFLATE_CHUNK)
                if not compressed:
                    self.input_exhausted = True
                    return
            try:
                self.buffer += self.inflater.decompress(compressed, DEFLATE_CHUNK)
            except zlib.error as error:
                raise DicomFileError(f"the deflated data set cannot be inflated: {error}") from error

    def _take(self, count: int, description: str, tag: tuple[int, int] | None) -> bytes:
        """Return the next COUNT inflated bytes, reading at most DEFLATE_CHUNK of them at a time."""
        result = bytearray()
        while len(result) < count:
            self._fill(min(count - len(result), DEFLATE_CHUNK))
            if not self._available():
                raise TruncatedError(f"truncated: the deflated data set ends inside {_subject(description, tag)} "
                                     f"at inflated byte {self.offset}")
            step = min(count - len(result), self._available())
            result += self.buffer[self.position: self.position + step]
            self.position += step
        self.offset += count
        return bytes(result)

    def read(self, count: int, description: str, tag: tuple[int, int] | None = None) -> bytes:
        return self._take(count, description, tag)

    def skip(self, count: int, description: str, tag: tuple[int, int] | None = None) -> None:
        # Inflated values are read and dropped in chunks, so memory stays bounded.
        remaining = count
        while remaining:
            step = min(remaining, DEFLATE_CHUNK)
            self._take(step, description, tag)
            remaining -= step

    def at_end(self) -> bool:
        self._fill(1)
        if self._available():
            return False
        if self.input_exhausted and not self.inflater.eof:
            raise TruncatedError("truncated: the deflate stream of the data set ends before its final block")
        return True


class _DatasetWalker:
    """Walk the elements of a data set, checking that every value fits in the file."""

    def __init__(self, reader, little_endian: bool, explicit_vr: bool):
        self.reader = reader
        self.little_endian = little_endian
        self.explicit_vr = explicit_vr
        self.uids: dict[tuple[int, int], str] = {}
        self.patient_id: str | None = ""
        self.pixel_data_seen = False
        order = "<" if little_endian else ">"
        self._tag = struct.Struct(order + "HH")
        self._uint16 = struct.Struct(order + "H")
        self._uint32 = struct.Struct(order + "I")

    def read_header(self, explicit_vr: bool) -> tuple[tuple[int, int], bytes, int, int]:
        """Read one element header; return its tag, VR (b"" when implicit), value length and offset."""
        start = self.reader.offset
        # Every element header has at least 8 bytes: tag and VR with a 16-bit length, or tag and 32-bit length.
        header = self.reader.read(8, "an element header")
        tag = self._tag.unpack_from(header)

        if tag[0] == 0xFFFE or not explicit_vr:
            return tag, b"", self._uint32.unpack_from(header, 4)[0], start

        vr = header[4:6]
        if vr in SHORT_LENGTH_VRS:
            return tag, vr, self._uint16.unpack_from(header, 6)[0], start

        # A VR that PS3.5 does not define is read like UN: two reserved bytes, then a 32-bit length.
        length = self._uint32.unpack(self.reader.read(4, "the header of element", tag))[0]
        return tag, vr, length, start

    def walk(self, depth: int = 0, explicit_vr: bool | None = None) -> None:
        """Walk elements until the end of the data set, or of the item when DEPTH is above 0."""
        if explicit_vr is None:
            explicit_vr = self.explicit_vr
        if depth == 0 and isinstance(self.reader, _FileReader):
            self._walk_file()
            return

        while True:
            if depth == 0 and self.reader.at_end():
                return
            if not self._step(depth, explicit_vr):
                return

    def _walk_file(self) -> None:
        """Walk the top level of a data set read from a file, parsing plain element headers in memory.

        An element that is not plain (a sequence, an item, a value the check reads, Pixel
        Data, or one that runs past the end of the file) goes through _step. This walks a
        CT slice of 265 elements in about a third of the time of _step alone.
        """
        reader = self.reader
        handle = reader.handle
        size = reader.size
        explicit_vr = self.explicit_vr
        unpack_tag = self._tag.unpack_from
        unpack_uint16 = self._uint16.unpack_from
        unpack_uint32 = self._uint32.unpack_from
        offset = reader.offset
        window = b""
        window_start = offset

        while offset < size:
            position = offset - window_start
            if position < 0 or position + 12 > len(window):
                handle.seek(offset)
                window = handle.read(FILE_WINDOW)
                window_start = offset
                position = 0
            if position + 12 <= len(window):
                tag = unpack_tag(window, position)
                if tag[0] != 0xFFFE and tag not in STEPPED_TAGS:
                    if not explicit_vr:
                        length, header = unpack_uint32(window, position + 4)[0], 8
                    elif window[position + 4:position + 6] in SHORT_LENGTH_VRS:
                        length, header = unpack_uint16(window, position + 6)[0], 8
                    else:
                        length, header = unpack_uint32(window, position + 8)[0], 12
                    end = offset + header + length
                    if length != UNDEFINED_LENGTH and end <= size:
                        offset = end
                        continue

            handle.seek(offset)
            reader.offset = offset
            self._step(0, explicit_vr)
            offset = reader.offset
            window = b""
        reader.offset = offset

    def _step(self, depth: int, explicit_vr: bool) -> bool:
        """Walk one element; return False at the item delimiter that ends the item at DEPTH."""
        tag, vr, length, start = self.read_header(explicit_vr)
        if depth == 0 and tag in PIXEL_DATA_TAGS:
            self.pixel_data_seen = True
        if tag == ITEM_DELIMITATION:
            return depth == 0

        if length == UNDEFINED_LENGTH:
            # UN values of undefined length are encoded in Implicit VR Little Endian (PS3.5 6.2.2).
            inner_explicit = explicit_vr and vr != b"UN"
            self._walk_items(tag, start, depth + 1, inner_explicit)
            return True

        if depth == 0 and tag in READ_TAGS and length <= MAX_READ_UID_LENGTH:
            value = self.reader.read(length, "the value of element", tag)
            if tag == PATIENT_ID:
                self.patient_id = _patient_id_text(vr, value)
            else:
                self.uids[tag] = value.decode("ascii", "replace").strip("\0 ")
            return True
        if depth == 0 and tag == PATIENT_ID:
            self.reader.skip(length, "element", tag)
            self.patient_id = None
            return True
        if depth == 0 and tag in REQUIRED_UIDS:
            # Orthanc 1.10.1 accepts UIDs over the standard's 64 characters, so a long one counts as present.
            self.reader.skip(length, "element", tag)
            self.uids[tag] = f"(a UID of {length} bytes)"
            return True

        self.reader.skip(length, "element", tag)
        return True

    def _walk_items(self, tag: tuple[int, int], start: int, depth: int, explicit_vr: bool) -> None:
        """Walk the items of a sequence or encapsulated pixel data of undefined length."""
        if depth > MAX_SEQUENCE_DEPTH:
            raise DicomFileError(
                f"element {_tag_text(tag)} at byte {start} nests sequences deeper than {MAX_SEQUENCE_DEPTH} levels")

        while True:
            if self.reader.at_end():
                raise TruncatedError(
                    f"truncated: the file ends inside element {_tag_text(tag)} of undefined length "
                    f"that starts at byte {start}")

            item_tag, _, length, item_start = self.read_header(explicit_vr)
            if item_tag == SEQUENCE_DELIMITATION:
                return
            if item_tag != ITEM:
                raise DicomFileError(
                    f"element {_tag_text(tag)} at byte {start} contains {_tag_text(item_tag)} at byte "
                    f"{item_start} where an item or a sequence delimiter belongs")

            if length == UNDEFINED_LENGTH:
                self.walk(depth, explicit_vr)
            else:
                self.reader.skip(length, "an item of element", tag)


def _patient_id_text(vr: bytes, value: bytes) -> str | None:
    """Return a Patient ID value as Orthanc hashes it, or None when that depends on more than the bytes."""
    # b"" is implicit VR, where the data dictionary gives LO. Orthanc keeps a UN value's padding.
    if vr not in (b"LO", b""):
        return None
    if not value.isascii():
        # Orthanc converts the value from the Specific Character Set (0008,0005) before hashing it.
        return None
    # Orthanc 1.10.1 drops trailing padding but keeps leading spaces.
    return value.decode("ascii").rstrip("\0 ")


def _plausible_first_group(group: int) -> bool:
    # A bare data set starts with a low group: File Meta (0002), directory (0004),
    # identifying (0008) or patient (0010) elements.
    return 0x0002 <= group <= 0x0010 and group % 2 == 0


def _guess_encoding(start: bytes) -> tuple[bool, bool] | None:
    """Guess (little endian, explicit VR) from the first element of a data set, or None."""
    if len(start) < 8:
        return None

    group_little = struct.unpack("<H", start[:2])[0]
    group_big = struct.unpack(">H", start[:2])[0]
    has_vr = start[4:6] in KNOWN_VRS

    if _plausible_first_group(group_little):
        return True, has_vr
    if has_vr and _plausible_first_group(group_big):
        return False, True
    return None


def _encoding_of(transfer_syntax: str) -> tuple[bool, bool]:
    """Return (little endian, explicit VR) of a transfer syntax."""
    if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        return True, False
    if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:
        return False, True
    # Every other transfer syntax, compressed ones included, encodes the data set in Explicit VR Little Endian.
    return True, True


def _read_file_meta(handle, size: int) -> str:
    """Walk the File Meta Information group (0002) after the prefix and return its Transfer Syntax UID."""
    reader = _FileReader(handle, size)
    walker = _DatasetWalker(reader, little_endian=True, explicit_vr=True)
    transfer_syntax = ""

    while not reader.at_end():
        start = reader.offset
        group_data = handle.read(2)
        handle.seek(start)
        if len(group_data) < 2 or struct.unpack("<H", group_data)[0] != 0x0002:
            break

        tag, _, length, _ = walker.read_header(explicit_vr=True)
        if length == UNDEFINED_LENGTH:
            raise DicomFileError(f"File Meta element {_tag_text(tag)} at byte {start} has an undefined length")
        if tag == TRANSFER_SYNTAX_UID and length <= MAX_READ_UID_LENGTH:
            transfer_syntax = reader.read(length, "the Transfer Syntax UID").decode("ascii", "replace").strip("\0 ")
        else:
            reader.skip(length, "File Meta element", tag)

    return transfer_syntax


def _check_open_file(handle, size: int) -> Verdict:
    if size == 0:
        return Verdict(False, "the file is empty (0 bytes)", may_grow=True)

    head = handle.read(MIN_PART10_LENGTH)
    transfer_syntax = ""
    if len(head) == MIN_PART10_LENGTH and head[PREAMBLE_LENGTH:] == PREFIX:
        transfer_syntax = _read_file_meta(handle, size)
        dataset_start = handle.tell()
    else:
        dataset_start = 0

    handle.seek(dataset_start)
    if transfer_syntax:
        little_endian, explicit_vr = _encoding_of(transfer_syntax)
    else:
        guess = _guess_encoding(handle.read(8))
        handle.seek(dataset_start)
        if guess is None:
            if dataset_start == 0 and size < MIN_PART10_LENGTH:
                return Verdict(False, f"the file is too short to be DICOM: {size} bytes, and a DICOM file "
                                      f"has at least {MIN_PART10_LENGTH}", may_grow=True)
            if dataset_start == 0:
                return Verdict(False, "not a DICOM file: it has no 'DICM' prefix at byte 128 "
                                      "and does not start with a DICOM data set element")
            return Verdict(False, f"the data set at byte {dataset_start} does not start with a DICOM element "
                                  "and the File Meta Information names no Transfer Syntax UID")
        little_endian, explicit_vr = guess

    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        reader = _DeflateReader(handle)
    else:
        reader = _FileReader(handle, size)

    walker = _DatasetWalker(reader, little_endian, explicit_vr)
    if reader.at_end():
        return Verdict(False, f"truncated: the file ends at byte {size}, before its data set",
                       may_grow=True, transfer_syntax=transfer_syntax)
    walker.walk()

    # A file cut at an element boundary parses cleanly, so one without pixel data may be
    # an image whose writer has not finished yet.
    # NOTE: a cut after the Pixel Data but before trailing elements still looks complete.
    pixel_data_missing = not walker.pixel_data_seen

    for tag, name in REQUIRED_UIDS.items():
        if not walker.uids.get(tag):
            return Verdict(False, f"missing {name}, which Orthanc needs to identify the instance",
                           may_grow=pixel_data_missing, transfer_syntax=transfer_syntax)

    reason = "it has no Pixel Data (7FE0,0010) yet, which an image file ends with" if pixel_data_missing else ""

    return Verdict(
        True,
        reason=reason,
        may_grow=pixel_data_missing,
        transfer_syntax=transfer_syntax,
        sop_instance_uid=walker.uids[(0x0008, 0x0018)],
        study_instance_uid=walker.uids[(0x0020, 0x000D)],
        series_instance_uid=walker.uids[(0x0020, 0x000E)],
        patient_id=walker.patient_id,
    )


def check(path: str | os.PathLike) -> Verdict:
    """Check the file at PATH and return whether it is a complete DICOM instance.

    Accepts a DICOM PS3.10 file (128-byte preamble, "DICM", File Meta
    Information) or a bare data set, like Orthanc 1.10.1 does. Rejects empty,
    non-DICOM and truncated files (an element whose value runs past the end of
    the file, or a sequence without its delimiter) and instances without the
    UIDs Orthanc indexes them by. Raises OSError when the file cannot be read.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            return _check_open_file(handle, size)
        except TruncatedError as error:
            return Verdict(False, str(error), may_grow=True)
        except DicomFileError as error:
            return Verdict(False, str(error))
