"""The DICOM C-STORE clients measured against Orthanc: DCMTK's storescu and dcmsend, and pynetdicom.

storescu can exit 0 after Orthanc rejected its association or a store, so every
run is judged from the client's own output and from Orthanc's instance count.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.transport import AssociationSocket

from bench.archive import DICOM_CLIENT_AET, BenchArchive
from bench.stats import TimedRun

log = logging.getLogger(__name__)

SETTLE_TIMEOUT_S = 10.0

# C-STORE response status 0x0000: Success (PS3.7 Annex C.4.2.1.4 and 9.1.1.1.9).
STATUS_SUCCESS = 0x0000


@dataclasses.dataclass
class StoreOutcome:
    """A DCMTK client's report: whether the association was accepted, and the stores that succeeded."""

    association_accepted: bool
    successes: int
    failures: int
    rejection: str = ""


def parse_storescu_output(text: str) -> StoreOutcome:
    """Read ``storescu -v`` output: "Association Accepted", one "Received Store Response (...)" per file."""
    accepted = "Association Accepted" in text
    responses = re.findall(r"Received Store Response \(([^)]*)\)", text)
    successes = sum(1 for status in responses if status == "Success")
    rejection = _rejection_reason(text)
    return StoreOutcome(accepted, successes, len(responses) - successes, rejection)


def parse_dcmsend_output(text: str) -> StoreOutcome:
    """Read ``dcmsend -v`` output: its status summary's "with status SUCCESS" count."""
    accepted = "Association Accepted" in text
    summary = re.search(r"\* with status SUCCESS\s*:\s*(\d+)", text)
    sent = re.search(r"- sent to the peer\s*:\s*(\d+)", text)
    successes = int(summary.group(1)) if summary else 0
    failures = (int(sent.group(1)) if sent else 0) - successes
    return StoreOutcome(accepted, successes, failures, _rejection_reason(text))


def _rejection_reason(text: str) -> str:
    lines = [line for line in text.splitlines() if "Rejected" in line or line.startswith("F: Reason")]
    return " ".join(line.strip() for line in lines)


def _dcmtk_run(name: str, tool: str, parse, archive: BenchArchive, files: list[Path],
               extra: list[str]) -> TimedRun:
    arguments = [tool, "-v", *extra, "-aet", DICOM_CLIENT_AET, "-aec", archive.aet,
                 "127.0.0.1", str(archive.dicom_port)]
    started = time.monotonic()
    result = subprocess.run(arguments + [str(path) for path in files], capture_output=True, text=True,
                            check=False)
    seconds = time.monotonic() - started

    outcome = parse(result.stdout + "\n" + result.stderr)
    archive.wait_for_instances(len(files), SETTLE_TIMEOUT_S)
    stored = archive.count_instances()
    note = ""
    if not outcome.association_accepted or outcome.successes != len(files):
        note = (f"exit status {result.returncode}; association accepted: {outcome.association_accepted}; "
                f"{outcome.successes} stores succeeded, {outcome.failures} failed. {outcome.rejection}").strip()
        log.error("%s did not store every file: %s", name, note)
    folder = files[0].parent if files else Path(".")
    shown = " ".join(arguments + [f"{folder}/*.dcm"])
    return TimedRun(name, len(files), seconds, stored, shown, note)


def storescu(archive: BenchArchive, files: list[Path]) -> TimedRun:
    """Send FILES with DCMTK ``storescu`` over one association."""
    return _dcmtk_run("DCMTK storescu, one association", "storescu", parse_storescu_output,
                      archive, files, [])


def dcmsend(archive: BenchArchive, files: list[Path]) -> TimedRun:
    """Send FILES with DCMTK ``dcmsend`` over one association."""
    return _dcmtk_run("DCMTK dcmsend", "dcmsend", parse_dcmsend_output, archive, files,
                      ["--single-association"])


class QuickAckSocket(AssociationSocket):
    """An association socket that sets TCP_NODELAY and re-arms TCP_QUICKACK before every read.

    Linux clears TCP_QUICKACK after it acknowledges, so the flag is set again each
    time; without it the client delays the ACK of each C-STORE response.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        """Read NR_BYTES like AssociationSocket.recv, acknowledging at once."""
        if self.socket is not None:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return super().recv(nr_bytes)


class _TunedAE(AE):
    """A pynetdicom AE whose association sockets get TCP_NODELAY and, optionally, re-armed TCP_QUICKACK."""

    def __init__(self, quickack: bool, **kwargs):
        super().__init__(**kwargs)
        self.quickack = quickack

    def _create_socket(self, assoc, address, tls_args):
        socket_class = QuickAckSocket if self.quickack else AssociationSocket
        sock = socket_class(assoc, address=address)
        sock.tls_args = tls_args
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def _pynetdicom_send(archive: BenchArchive, files: list[Path], associations: int, nodelay: bool,
                     quickack: bool) -> int:
    """Send FILES over ASSOCIATIONS parallel associations; return the count of Success statuses."""
    if nodelay:
        ae = _TunedAE(quickack, ae_title=DICOM_CLIENT_AET)
    else:
        ae = AE(ae_title=DICOM_CLIENT_AET)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    shares = [files[n::associations] for n in range(associations)]
    successes = [0] * associations

    def send(number: int) -> None:
        assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title=archive.aet)
        if not assoc.is_established:
            log.error("Orthanc did not accept the association of pynetdicom client %d.", number)
            return
        for path in shares[number]:
            status = assoc.send_c_store(path)
            if status and status.Status == STATUS_SUCCESS:
                successes[number] += 1
        assoc.release()

    threads = [threading.Thread(target=send, args=(n,), name=f"bench-scu-{n}") for n in range(associations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ae.shutdown()
    return sum(successes)


def pynetdicom_store(archive: BenchArchive, files: list[Path], associations: int = 1,
                     nodelay: bool = False, quickack: bool = False) -> TimedRun:
    """Send FILES with pynetdicom's send_c_store over ASSOCIATIONS associations, tuned as asked."""
    started = time.monotonic()
    successes = _pynetdicom_send(archive, files, associations, nodelay, quickack)
    seconds = time.monotonic() - started

    archive.wait_for_instances(len(files), SETTLE_TIMEOUT_S)
    stored = archive.count_instances()
    tuning = "defaults"
    if quickack:
        tuning = "TCP_NODELAY, TCP_QUICKACK re-armed before every read"
    elif nodelay:
        tuning = "TCP_NODELAY"
    name = f"pynetdicom, {associations} association{'s' if associations > 1 else ''}, {tuning}"
    shown = (f"python: pynetdicom AE('{DICOM_CLIENT_AET}'), {associations} association(s) to "
             f"127.0.0.1:{archive.dicom_port} '{archive.aet}', assoc.send_c_store(path) per file ({tuning})")
    note = "" if successes == len(files) else f"{successes} stores answered Success"
    return TimedRun(name, len(files), seconds, stored, shown, note)
