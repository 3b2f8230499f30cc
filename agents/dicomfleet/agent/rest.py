"""Send one DICOM file to Orthanc's REST API, and read back what the after-send check needs.

``POST /instances`` streams the file from disk with the machine's own Orthanc user, which
Orthanc records as the instance's HttpUsername metadata: the sync names the machine from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

from dicomfleet.agent.httpclient import (DEFAULT_BLOCK, BodyReadError, HttpClient, RequestFailed, Response,
                                         basic_authorization)

log = logging.getLogger(__name__)

# Orthanc responds to POST /instances only after storing and indexing the file.
READ_TIMEOUT_S = 300.0
OTHER_TIMEOUT_S = 60.0
# Block size for reading, hashing and sending a file body: the client's send block.
BODY_BLOCK = DEFAULT_BLOCK

STATUS_SUCCESS = "Success"
STATUS_ALREADY_STORED = "AlreadyStored"

# Orthanc error codes (OrthancStatus in an error body) that blame the file itself, as
# Orthanc 1.10.1 returns them to POST /instances: 15 BadFileFormat (HTTP 400, also for an
# empty body) and 21 InexistentTag (HTTP 404, a UID Orthanc indexes by is missing).
BAD_FILE_CODES = frozenset({15, 21})


class TransientError(Exception):
    """Orthanc could not be reached, timed out, or failed in a way that a retry may fix."""


class AuthError(Exception):
    """Orthanc rejected the machine's credentials (HTTP 401 or 403)."""

    def __init__(self, status: int):
        self.status = status
        super().__init__(f"HTTP {status}")


class FileRejected(Exception):
    """Orthanc rejected the file itself as not valid DICOM."""


class FileChangedError(Exception):
    """The file became shorter while it was being sent."""


class InstanceNotFound(TransientError):
    """Orthanc has no instance with the ID a request named (HTTP 404)."""


@dataclasses.dataclass(frozen=True)
class OrthancTarget:
    """The Orthanc URL, credentials and TLS verification that a machine's files are sent with."""

    url: str
    auth: tuple[str, str]
    # True for the system's CA certificates, or the path of a CA file.
    verify: bool | str = True

    @property
    def authorization(self) -> str:
        """The Authorization header of the machine's Orthanc user."""
        return basic_authorization(*self.auth)


@dataclasses.dataclass(frozen=True)
class StoreResult:
    """Orthanc's response to POST /instances and the digests of the bytes sent."""

    status: str
    instance_id: str
    sha256: str
    # Empty unless the caller requested it.
    md5: str = ""


def instance_id_of(patient_id: str, study_instance_uid: str, series_instance_uid: str,
                   sop_instance_uid: str) -> str:
    """Return the ID Orthanc gives an instance: the SHA-1 of its four keys joined by "|", in five groups of 8.

    This is Orthanc's DicomInstanceHasher (checked against Orthanc 1.10.1 with pydicom's test
    files). Orthanc hashes the values as it decodes them, so a Patient ID that Orthanc
    decodes differently (another character set, or VR UN with padding) gives another ID.
    """
    digest = hashlib.sha1(
        f"{patient_id}|{study_instance_uid}|{series_instance_uid}|{sop_instance_uid}".encode("utf-8")).hexdigest()
    return "-".join(digest[start:start + 8] for start in range(0, 40, 8))


class _FileBody:
    """A request body that streams SIZE bytes of a file and hashes them on the way."""

    def __init__(self, handle, size: int, with_md5: bool):
        self.handle = handle
        self.size = size
        self.remaining = size
        self.digest = hashlib.sha256()
        # Orthanc reports the MD5 of each stored attachment, so the after-send check compares MD5s.
        self.md5 = hashlib.md5() if with_md5 else None

    def __len__(self) -> int:
        return self.size

    def read(self, amount: int = -1) -> bytes:
        if self.remaining == 0:
            return b""
        if amount is None or amount < 0:
            amount = self.remaining
        amount = min(amount, self.remaining, BODY_BLOCK)

        try:
            data = self.handle.read(amount)
        except OSError as error:
            raise BodyReadError(error) from error
        if not data:
            raise FileChangedError(
                f"the file ended after {self.size - self.remaining} of the {self.size} bytes it had when queued")
        self.digest.update(data)
        if self.md5 is not None:
            self.md5.update(data)
        self.remaining -= len(data)
        return data


def _error_summary(response: Response) -> tuple[str, int | None]:
    """Return the message of an error response and its Orthanc error code (None without a JSON body)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip().replace("\n", " ")
        return (text[:200] or response.reason or "no details"), None
    if not isinstance(body, dict):
        return str(body)[:200], None

    message = str(body.get("Message") or body.get("OrthancError") or response.reason)
    details = body.get("Details")
    if details:
        message = f"{message}: {details}"
    code = body.get("OrthancStatus")
    return message, code if isinstance(code, int) else None


def _raise_for_status(response: Response, action: str) -> None:
    """Raise the exception that classifies a non-2xx response to ACTION."""
    if response.status in (401, 403):
        raise AuthError(response.status)

    message, _ = _error_summary(response)
    raise TransientError(f"{action} returned HTTP {response.status}: {message}")


def store_instance(client: HttpClient, target: OrthancTarget, path: str, size: int,
                   with_md5: bool = True) -> StoreResult:
    """POST the first SIZE bytes of the file PATH to ``/instances`` and return Orthanc's response.

    The result carries the SHA-256 of the bytes sent and, when WITH_MD5 is true, their MD5.

    A broken connection is retried once at once, because Orthanc may close an idle
    keep-alive connection just as it is reused. Resending is safe because Orthanc
    returns AlreadyStored for an instance it has. Raises TransientError,
    AuthError, FileRejected, FileChangedError or OSError.
    """
    url = f"{target.url}/instances"
    headers = {"Authorization": target.authorization, "Content-Type": "application/dicom",
               "Content-Length": str(size)}
    for attempt in (1, 2):
        with open(path, "rb") as handle:
            body = _FileBody(handle, size, with_md5)
            try:
                response = client.request("POST", url, body=body, headers=headers, verify=target.verify,
                                          timeout=READ_TIMEOUT_S)
            except BodyReadError as error:
                raise error.error from None
            except RequestFailed as error:
                if attempt == 1 and not error.timed_out:
                    log.debug("POST %s for %s failed (%s); retrying once at once in case Orthanc closed an idle "
                              "keep-alive connection.", url, path, error)
                    continue
                raise TransientError(f"POST {url} failed: {error}") from error
        break

    if response.status in (400, 404, 415):
        message, code = _error_summary(response)
        if response.status == 415 or code in BAD_FILE_CODES:
            raise FileRejected(f"Orthanc rejected the file (HTTP {response.status}): {message}")
    if not response.ok:
        _raise_for_status(response, "POST /instances")

    try:
        result = response.json()
        status = result["Status"]
        instance_id = result["ID"]
    except (ValueError, KeyError, TypeError) as error:
        raise TransientError(
            f"POST /instances returned a response without Status and ID: {response.text[:200]!r}") from error

    if status not in (STATUS_SUCCESS, STATUS_ALREADY_STORED):
        raise TransientError(f"POST /instances returned Status {status!r} for instance {instance_id}")
    return StoreResult(status=status, instance_id=instance_id, sha256=body.digest.hexdigest(),
                       md5=body.md5.hexdigest() if body.md5 is not None else "")


def _request(client: HttpClient, method: str, target: OrthancTarget, path: str, body: bytes | None = None,
             stream: bool = False) -> Response:
    url = f"{target.url}{path}"
    try:
        return client.request(method, url, body=body, headers={"Authorization": target.authorization},
                              verify=target.verify, timeout=READ_TIMEOUT_S if stream else OTHER_TIMEOUT_S,
                              stream=stream)
    except RequestFailed as error:
        raise TransientError(f"{method} {url} failed: {error}") from error


def find_instance(client: HttpClient, target: OrthancTarget, sop_instance_uid: str) -> str | None:
    """Return the Orthanc ID of the instance with SOP_INSTANCE_UID, or None when Orthanc has none.

    NOTE: when two studies hold the same SOP Instance UID, the first one Orthanc lists is returned.
    """
    response = _request(client, "POST", target, "/tools/lookup", body=sop_instance_uid.encode("ascii", "replace"))
    if not response.ok:
        _raise_for_status(response, "POST /tools/lookup")
    try:
        matches = response.json()
    except ValueError as error:
        raise TransientError(f"POST /tools/lookup returned no JSON: {response.text[:200]!r}") from error
    for match in matches:
        if isinstance(match, dict) and match.get("Type") == "Instance":
            return str(match["ID"])
    return None


def stored_md5(client: HttpClient, target: OrthancTarget, instance_id: str) -> str:
    """Return the MD5 that Orthanc computed for the stored DICOM file of INSTANCE_ID.

    Raises InstanceNotFound when Orthanc has no instance INSTANCE_ID.
    """
    path = f"/instances/{instance_id}/attachments/dicom/md5"
    response = _request(client, "GET", target, path)
    if response.status == 404:
        message, _ = _error_summary(response)
        raise InstanceNotFound(f"GET {path} returned HTTP 404: {message}")
    if not response.ok:
        _raise_for_status(response, f"GET {path}")
    return response.text.strip().strip('"')


def stored_dataset_md5(client: HttpClient, target: OrthancTarget, instance_id: str) -> str:
    """Return the MD5 of the data set of INSTANCE_ID's stored file, without its file meta information.

    Orthanc writes its own file meta information for an instance received by C-STORE, so
    only the data set can match the sent file. The file is streamed, never held in memory.
    Raises InstanceNotFound when Orthanc has no instance INSTANCE_ID.
    """
    path = f"/instances/{instance_id}/file"
    with _request(client, "GET", target, path, stream=True) as response:
        if response.status == 404:
            raise InstanceNotFound(f"GET {path} returned HTTP 404")
        if not response.ok:
            _raise_for_status(response, f"GET {path}")
        try:
            return _dataset_md5(response.iter_body(BODY_BLOCK))
        except RequestFailed as error:
            raise TransientError(f"GET {target.url}{path} failed: {error}") from error


def _dataset_md5(chunks) -> str:
    """Return the MD5 of a Part 10 stream after its preamble and file meta group, whose length is (0002,0000)."""
    buffer = bytearray()
    chunks = iter(chunks)
    # Preamble (128), "DICM" (4), then (0002,0000) UL in explicit VR little endian: 12 bytes.
    header_length = 128 + 4 + 12
    for chunk in chunks:
        buffer += chunk
        if len(buffer) >= header_length:
            break
    if len(buffer) < header_length or bytes(buffer[128:132]) != b"DICM" or bytes(buffer[132:136]) != b"\x02\x00\x00\x00":
        raise TransientError("Orthanc's stored file does not start with file meta information and its group length")
    skip = header_length + int.from_bytes(buffer[140:144], "little")

    digest = hashlib.md5()
    while len(buffer) < skip:
        chunk = next(chunks, None)
        if chunk is None:
            raise TransientError("Orthanc's stored file ends inside its file meta information")
        buffer += chunk
    digest.update(bytes(buffer[skip:]))
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def delete_instance(client: HttpClient, target: OrthancTarget, instance_id: str) -> None:
    """Delete INSTANCE_ID from Orthanc."""
    path = f"/instances/{instance_id}"
    response = _request(client, "DELETE", target, path)
    if not response.ok and response.status_code != 404:
        _raise_for_status(response, f"DELETE {path}")
