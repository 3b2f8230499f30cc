"""The DICOM terms that the inventory and every service's configuration check: modalities and AE titles.

Kept apart from the inventory validation, so a service checks its own
configuration without importing what the inventory checks need.
"""

from __future__ import annotations

from typing import Any

# Modality defined terms of DICOM PS3.3 C.7.3.1.1.1 that imaging machines send.
MODALITIES = frozenset(
    """AR AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL
    IVOCT IVUS KER KO LEN LS MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT
    PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTPLAN RTRECORD RTSTRUCT RWV SEG
    SM SMR SR SRF STAIN TG US VA XA XC""".split()
)


def ae_title_problem(value: Any) -> str | None:
    """Return why VALUE is not a valid AE title, or None when it is valid.

    An AE title (PS3.5 6.2, VR AE) is 1 to 16 characters of the default
    character repertoire, without backslash or control characters. Leading and
    trailing spaces are not significant, so a title of spaces only is empty.
    """
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not a string"
    if len(value) > 16:
        return f"is {len(value)} characters long, over the maximum of 16"
    for character in value:
        if character == "\\":
            return "contains a backslash"
        if not " " <= character <= "~":
            return f"contains the character {character!r}, outside the DICOM default repertoire"
    if not value.strip():
        return "is empty"
    return None
