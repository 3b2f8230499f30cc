"""Unit tests of bench.dicom_clients' readers of DCMTK output (storescu can exit 0 after a rejection)."""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ is a top-level package of the checkout, not part of the installed dicomfleet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dicom_clients import parse_dcmsend_output, parse_storescu_output  # noqa: E402

# Output of DCMTK 3.6.7's storescu -v and dcmsend -v against Orthanc 1.10.1.
STORESCU_SUCCESS = """I: checking input files ...
I: Requesting Association
I: Association Accepted (Max Send PDV: 16372)
I: Sending file: /tmp/ct/ct_001_856724013703.dcm
I: Converting transfer syntax: Little Endian Explicit -> Little Endian Explicit
I: Sending Store Request (MsgID 1, CT)
XMIT: .................................
I: Received Store Response (Success)
I: Sending file: /tmp/ct/ct_001_075812049815.dcm
I: Sending Store Request (MsgID 2, CT)
I: Received Store Response (Success)
I: Releasing Association
"""

STORESCU_REJECTED = """I: checking input files ...
I: Requesting Association
F: Association Rejected:
F: Result: Rejected Permanent, Source: Service User
F: Reason: Calling AE Title Not Recognized
"""

STORESCU_STORE_FAILED = """I: Requesting Association
I: Association Accepted (Max Send PDV: 16372)
I: Sending Store Request (MsgID 1, CT)
I: Received Store Response (Success)
I: Sending Store Request (MsgID 2, CT)
I: Received Store Response (Cannot understand)
I: Releasing Association
"""

DCMSEND_SUCCESS = """I: checking input files ...
I: starting association #1
I: Requesting Association
I: Association Accepted (Max Send PDV: 16372)
I: sending SOP instances ...
I: Sending C-STORE Request (MsgID 1, CT)
I: Received C-STORE Response (Success)
I: Releasing Association
I:
I: Status Summary
I: --------------
I: Number of associations   : 1
I: Number of pres. contexts : 1
I: Number of SOP instances  : 3
I: - sent to the peer       : 3
I:   * with status SUCCESS  : 3
"""

DCMSEND_REJECTED = """I: checking input files ...
I: starting association #1
I: Requesting Association
F: cannot negotiate network association: DUL Association Rejected
"""


def test_storescu_success_counts_stores():
    outcome = parse_storescu_output(STORESCU_SUCCESS)
    assert outcome.association_accepted is True
    assert outcome.successes == 2
    assert outcome.failures == 0


def test_storescu_rejected_association():
    outcome = parse_storescu_output(STORESCU_REJECTED)
    assert outcome.association_accepted is False
    assert outcome.successes == 0
    assert "Calling AE Title Not Recognized" in outcome.rejection


def test_storescu_failed_store_counted():
    outcome = parse_storescu_output(STORESCU_STORE_FAILED)
    assert outcome.successes == 1
    assert outcome.failures == 1


def test_dcmsend_summary_success_count():
    outcome = parse_dcmsend_output(DCMSEND_SUCCESS)
    assert outcome.association_accepted is True
    assert outcome.successes == 3
    assert outcome.failures == 0


def test_dcmsend_rejected_association():
    outcome = parse_dcmsend_output(DCMSEND_REJECTED)
    assert outcome.association_accepted is False
    assert outcome.successes == 0
    assert "Association Rejected" in outcome.rejection
