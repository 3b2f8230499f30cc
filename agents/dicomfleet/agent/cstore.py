"""Send DICOM files to Orthanc with C-STORE (pynetdicom), reusing one association per worker and machine.

Presentation contexts come from the files' own SOP classes and transfer syntaxes,
so compressed files are sent as they are; nothing is transcoded.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

# Send a file path's encoded data set in PDU-sized chunks straight from disk instead of
# decoding it, so a file of several GB costs little memory. This is a pynetdicom-wide
# setting, and the agent is its only user in its process.
_config.STORE_SEND_CHUNKED_DATASET = True

CONNECT_TIMEOUT_S = 10.0
# Orthanc sends the C-STORE response only after it stored and indexed the instance.
DIMSE_TIMEOUT_S = 300.0
NETWORK_TIMEOUT_S = 300.0
# Orthanc closes an association idle for DicomScpTimeout (30 s by default), so an
# association idle for longer than this is released and opened again before use.
IDLE_RELEASE_S = 20.0
# PS3.8 9.3.2.2: an association request carries at most 128 presentation contexts.
MAX_CONTEXTS = 128

STATUS_SUCCESS = 0x0000
# Warnings of the Storage Service (PS3.4 B.2.3): the instance is stored.
WARNING_STATUSES = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
# PS3.7 C: the peer is not allowed to store on this SCP.
STATUS_NOT_AUTHORIZED = 0x0124

# Association reject (PS3.8 9.3.4), result source "service user", reason 3: the calling
# AE title is not recognized. Orthanc 1.10.1 rejects this way when the calling AE title and
# address are not in its DicomModalities; the reject result (1 permanent, 2 transient) does not matter here.
REJECT_SOURCE_SERVICE_USER = 1
REJECT_REASON_CALLING_AE = 3


class TransientError(Exception):
    """The association failed, was aborted, or Orthanc returned a status that a later retry may fix."""


class CallingAeRejected(Exception):
    """Orthanc rejected the association because it does not know the machine's calling AE title and address."""


class FileRejected(Exception):
    """Orthanc cannot store this file, or no presentation context for it was accepted."""


class CannotUnderstand(Exception):
    """Orthanc returned 0xCxxx "cannot understand"; the caller retries a few times, then quarantines."""


@dataclasses.dataclass(frozen=True)
class StoreResult:
    """Orthanc's C-STORE response status and, for a warning, what it means."""

    status: int
    warning: str | None = None


@dataclasses.dataclass(frozen=True)
class FileSyntax:
    """The SOP class and transfer syntax that a file is sent with."""

    sop_class: str
    transfer_syntax: str
    # True when the file has Part 10 file meta information and is streamed from disk.
    part10: bool
    # Where the data set starts in the file: after the file meta information, or 0.
    dataset_offset: int = 0


def read_syntax(path: str) -> FileSyntax:
    """Return the SOP class and transfer syntax of the file PATH, reading only its header.

    Raises FileRejected when neither is found, and OSError when the file cannot be read.
    """
    try:
        file_meta, offset = split_dataset(Path(path))
    except (InvalidDicomError, ValueError, EOFError) as error:
        raise FileRejected(f"cannot read the file meta information: {error}") from error

    sop_class = str(file_meta.get("MediaStorageSOPClassUID", "") or "")
    transfer_syntax = str(file_meta.get("TransferSyntaxUID", "") or "")
    if sop_class and transfer_syntax:
        return FileSyntax(sop_class, transfer_syntax, part10=True, dataset_offset=offset)

    # A bare PS3.5 data set: read its header only; pydicom guesses the encoding.
    try:
        dataset = pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, ValueError, EOFError) as error:
        raise FileRejected(f"cannot read the data set: {error}") from error
    sop_class = str(dataset.get("SOPClassUID", "") or "")
    if not sop_class:
        raise FileRejected("the file has no SOP Class UID (0008,0016), which C-STORE needs")
    encoding = getattr(dataset, "original_encoding", (True, True))
    transfer_syntax = pydicom.uid.ImplicitVRLittleEndian
    if encoding == (False, True):
        transfer_syntax = pydicom.uid.ExplicitVRLittleEndian
    elif encoding == (False, False):
        transfer_syntax = pydicom.uid.ExplicitVRBigEndian
    return FileSyntax(sop_class, transfer_syntax, part10=False)


def _rearm_quick_ack(sock: socket.socket) -> None:
    """Set TCP_NODELAY and TCP_QUICKACK again, because Linux clears TCP_QUICKACK after some ACKs.

    Measured on Orthanc 1.10.1 over loopback (300 CT slices of 512 KB, one association,
    2 cores): 18.2 s with pynetdicom's defaults, 16.2 s with TCP_NODELAY alone, 3.3 s with
    TCP_QUICKACK re-armed before every read. The stall is this side's delayed ACK of
    Orthanc's response. TCP_QUICKACK exists on Linux only; elsewhere this sets TCP_NODELAY.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        quick_ack = getattr(socket, "TCP_QUICKACK", None)
        if quick_ack is not None:
            sock.setsockopt(socket.IPPROTO_TCP, quick_ack, 1)
    except OSError:
        # A socket that is closing refuses options; the read that follows reports the error.
        pass


class _QuickAckSocket(AssociationSocket):
    """An association socket that re-arms TCP_QUICKACK before every read from the socket."""

    def recv(self, nr_bytes: int) -> bytearray:
        data = bytearray()
        while len(data) < nr_bytes:
            _rearm_quick_ack(self.socket)
            chunk = self.socket.recv(min(65536, nr_bytes - len(data)))
            if not chunk:
                # The peer closed the connection; pynetdicom treats a short read as that.
                return data
            data.extend(chunk)
        return data


class _QuickAckAE(AE):
    """A pynetdicom AE whose requested associations use _QuickAckSocket."""

    def _create_socket(self, assoc, address, tls_args):
        sock = _QuickAckSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def _reject_summary(assoc: Association) -> tuple[str, bool]:
    """Return a sentence about an association reject and whether it names the calling AE title."""
    primitive = getattr(assoc.acceptor, "primitive", None)
    if primitive is None or primitive.result is None:
        return "the association was rejected", False
    calling_ae = (primitive.result_source == REJECT_SOURCE_SERVICE_USER
                  and primitive.diagnostic == REJECT_REASON_CALLING_AE)
    text = (f"the association was rejected ({primitive.result_str}, source {primitive.source_str}, "
            f"reason {primitive.reason_str})")
    return text, calling_ae


class CStoreLink:
    """One worker's association with Orthanc for one machine, opened on demand and reused across files."""

    def __init__(self, calling_aet: str, called_aet: str, host: str, port: int):
        self.calling_aet = calling_aet
        self.called_aet = called_aet
        self.host = host
        self.port = port
        self.ae = _QuickAckAE(ae_title=calling_aet)
        self.ae.acse_timeout = CONNECT_TIMEOUT_S
        self.ae.connection_timeout = CONNECT_TIMEOUT_S
        self.ae.dimse_timeout = DIMSE_TIMEOUT_S
        self.ae.network_timeout = NETWORK_TIMEOUT_S
        self.assoc: Association | None = None
        # Proposed (SOP class, transfer syntax) pairs, oldest first, and those Orthanc accepted.
        self.proposed: list[tuple[str, str]] = []
        self.accepted: set[tuple[str, str]] = set()
        self.last_used = 0.0

    def close(self) -> None:
        """Release the association, if one is open."""
        if self.assoc is not None and self.assoc.is_established:
            try:
                self.assoc.release()
            except Exception as error:
                log.debug("Releasing the association %s -> %s failed: %s.", self.calling_aet, self.called_aet, error)
        self.assoc = None

    def _open(self) -> None:
        self.close()
        self.ae.requested_contexts = []
        for sop_class, transfer_syntax in self.proposed:
            self.ae.add_requested_context(sop_class, [transfer_syntax])

        assoc = self.ae.associate(self.host, self.port, ae_title=self.called_aet)
        if assoc.is_established:
            self.assoc = assoc
            self.accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
            log.debug("Opened an association %s -> %s at %s:%d with %d of %d presentation contexts accepted.",
                      self.calling_aet, self.called_aet, self.host, self.port, len(self.accepted),
                      len(self.proposed))
            return

        if assoc.is_rejected:
            text, calling_ae = _reject_summary(assoc)
            if calling_ae:
                raise CallingAeRejected(f"Orthanc at {self.host}:{self.port} does not accept the calling AE title "
                                        f"{self.calling_aet!r} from this address: {text}")
            raise TransientError(f"Orthanc at {self.host}:{self.port}: {text}")
        if assoc.is_aborted:
            raise TransientError(f"Orthanc at {self.host}:{self.port} aborted the association request")
        raise TransientError(f"cannot open an association with Orthanc at {self.host}:{self.port}")

    def _ready_for(self, syntax: tuple[str, str]) -> None:
        """Make sure an open association has a presentation context for SYNTAX, opening a new one if needed."""
        alive = self.assoc is not None and self.assoc.is_established
        if alive and time.monotonic() - self.last_used > IDLE_RELEASE_S:
            self.close()
            alive = False
        if alive and syntax in self.accepted:
            return

        if syntax not in self.proposed:
            self.proposed.append(syntax)
            del self.proposed[:-MAX_CONTEXTS]
        elif alive:
            raise FileRejected(f"Orthanc accepts no presentation context for SOP class {syntax[0]} with "
                               f"transfer syntax {syntax[1]}, and the agent does not transcode")
        self._open()
        if syntax not in self.accepted:
            raise FileRejected(f"Orthanc accepts no presentation context for SOP class {syntax[0]} with "
                               f"transfer syntax {syntax[1]}, and the agent does not transcode")

    def store(self, path: str, syntax: FileSyntax) -> StoreResult:
        """Send the file PATH with C-STORE and return Orthanc's status.

        A send on a reused association that fails is retried once at once on a new
        one, because Orthanc may close an idle association just as it is reused.
        Raises TransientError, CallingAeRejected, FileRejected, CannotUnderstand or OSError.
        """
        pair = (syntax.sop_class, syntax.transfer_syntax)
        for attempt in (1, 2):
            reused = self.assoc is not None and self.assoc.is_established
            self._ready_for(pair)
            try:
                status = self._send(path, syntax)
            except TransientError as error:
                self.close()
                if attempt == 1 and reused:
                    log.debug("C-STORE of %s on a reused association failed (%s); retrying once on a new one.",
                              path, error)
                    continue
                raise
            self.last_used = time.monotonic()
            return _classify(status, path)
        raise AssertionError("unreachable")

    def _send(self, path: str, syntax: FileSyntax) -> int:
        assoc = self.assoc
        if syntax.part10:
            dataset = path
        else:
            # NOTE: a file without file meta information is decoded in memory to be sent.
            dataset = pydicom.dcmread(path, force=True)
        try:
            response = assoc.send_c_store(dataset)
        except (AttributeError, ValueError) as error:
            raise FileRejected(f"pynetdicom cannot send the file: {error}") from error
        except OSError:
            raise
        except RuntimeError as error:
            raise TransientError(f"the association with Orthanc ended: {error}") from error

        if assoc.is_aborted or not response or "Status" not in response:
            raise TransientError(f"Orthanc at {self.host}:{self.port} sent no C-STORE response "
                                 "(the association was aborted or timed out)")
        return int(response.Status)


def _classify(status: int, path: str) -> StoreResult:
    """Map a C-STORE status (PS3.4 Annex B.2.3, PS3.7 Annex C) to a result or an exception."""
    if status == STATUS_SUCCESS:
        return StoreResult(status)
    if status in WARNING_STATUSES:
        # Warnings mean Orthanc stored the instance, possibly altered: it counts as stored.
        return StoreResult(status, WARNING_STATUSES[status])
    if status & 0xFF00 == 0xA700:
        # Out of resources: Orthanc's disk or storage cap is full; the same file may be stored later.
        raise TransientError(f"Orthanc is out of resources (C-STORE status 0x{status:04X})")
    if status & 0xFF00 == 0xA900:
        # The data set does not match the SOP class it was sent as: resending cannot fix the file.
        raise FileRejected(f"Orthanc rejected the data set as not matching its SOP class "
                           f"(C-STORE status 0x{status:04X})")
    if status & 0xF000 == 0xC000:
        # Cannot understand: Orthanc could not parse the data set. Orthanc 1.10.1 also returns
        # 0xC000 for any exception during the store, so the caller retries a few times first.
        raise CannotUnderstand(f"Orthanc cannot understand the data set (C-STORE status 0x{status:04X})")
    if status == STATUS_NOT_AUTHORIZED:
        raise CallingAeRejected(f"Orthanc refused the store as not authorized (C-STORE status 0x{status:04X})")
    # Other failures, such as 0x0110 processing failure or 0x0211 unrecognized operation.
    raise TransientError(f"Orthanc failed to store {path} (C-STORE status 0x{status:04X})")
