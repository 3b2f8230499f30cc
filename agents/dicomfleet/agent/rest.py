"""Send one DICOM file to Orthanc's REST API and tag the instance with its source machine.

``POST /instances`` streams the file from disk; ``PUT /instances/{id}/metadata/SourceMachine``
records the machine (a UserMetadata entry declared in the rendered orthanc.json).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from urllib.parse import urlsplit

import requests
import requests.adapters

log = logging.getLogger(__name__)

SOURCE_MACHINE_METADATA = "SourceMachine"
CONNECT_TIMEOUT_S = 10.0
# Orthanc responds to POST /instances only after storing and indexing the file.
READ_TIMEOUT_S = 300.0
# Block size for reading, hashing and sending a file body. The requests default
# of 16 KiB costs one Python-level read and send per 16 KiB.
BODY_BLOCK = 1024 * 1024

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
    # requests' ``verify``: True for the system's CA certificates, or the path of a CA file.
    verify: bool | str = True


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

        data = self.handle.read(amount)
        if not data:
            raise FileChangedError(
                f"the file ended after {self.size - self.remaining} of the {self.size} bytes it had when queued")
        self.digest.update(data)
        if self.md5 is not None:
            self.md5.update(data)
        self.remaining -= len(data)
        return data


class _BlockAdapter(requests.adapters.HTTPAdapter):
    """A transport adapter whose connections send request bodies in blocks of BODY_BLOCK bytes."""

    def init_poolmanager(self, connections, maxsize, block=requests.adapters.DEFAULT_POOLBLOCK, **pool_kwargs):
        pool_kwargs.setdefault("blocksize", BODY_BLOCK)
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)


class _UploadSession(requests.Session):
    """A session that reads proxy and CA bundle settings from the environment once per URL origin.

    requests reads the environment again for every request, which cost about 0.4 ms of CPU
    per request in the benchmark's environment (cProfile, 2 cores). The agent's environment
    does not change while it runs, so the result for a scheme, host and port is reused.
    """

    def __init__(self):
        super().__init__()
        self._environment_settings: dict[tuple, dict] = {}

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        if proxies or not self.trust_env:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)

        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, stream, verify, cert)
        settings = self._environment_settings.get(key)
        if settings is None:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            self._environment_settings[key] = settings
        # A copy, so a caller that changes the result cannot change the cached settings.
        return dict(settings, proxies=dict(settings["proxies"]))


def new_session() -> requests.Session:
    """Return a keep-alive session for uploads to Orthanc, with large body blocks."""
    session = _UploadSession()
    session.mount("http://", _BlockAdapter())
    session.mount("https://", _BlockAdapter())
    return session


def _error_summary(response: requests.Response) -> tuple[str, int | None]:
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


def _raise_for_status(response: requests.Response, action: str) -> None:
    """Raise the exception that classifies a non-2xx response to ACTION."""
    if response.status_code in (401, 403):
        raise AuthError(response.status_code)

    message, _ = _error_summary(response)
    raise TransientError(f"{action} returned HTTP {response.status_code}: {message}")


def store_instance(session: requests.Session, target: OrthancTarget, path: str, size: int,
                   with_md5: bool = True) -> StoreResult:
    """POST the first SIZE bytes of the file PATH to ``/instances`` and return Orthanc's response.

    The result carries the SHA-256 of the bytes sent and, when WITH_MD5 is true, their MD5.

    A connection error is retried once at once, because Orthanc may close an idle
    keep-alive connection just as it is reused. Resending is safe because Orthanc
    returns AlreadyStored for an instance it has. Raises TransientError,
    AuthError, FileRejected, FileChangedError or OSError.
    """
    for attempt in (1, 2):
        with open(path, "rb") as handle:
            body = _FileBody(handle, size, with_md5)
            try:
                response = session.post(
                    f"{target.url}/instances", data=body, auth=target.auth, verify=target.verify,
                    headers={"Content-Type": "application/dicom"},
                    timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
            except requests.ConnectionError as error:
                if attempt == 1:
                    log.debug("POST %s/instances for %s failed (%s); retrying once at once in case Orthanc "
                              "closed an idle keep-alive connection.", target.url, path, error)
                    continue
                raise TransientError(f"cannot connect to Orthanc at {target.url}: {error}") from error
            except requests.Timeout as error:
                raise TransientError(f"Orthanc at {target.url} timed out: {error}") from error
            except requests.RequestException as error:
                raise TransientError(f"POST {target.url}/instances failed: {error}") from error
        break

    if response.status_code in (400, 404, 415):
        message, code = _error_summary(response)
        if response.status_code == 415 or code in BAD_FILE_CODES:
            raise FileRejected(f"Orthanc rejected the file (HTTP {response.status_code}): {message}")
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


def _request(session: requests.Session, method: str, target: OrthancTarget, path: str, **kwargs):
    url = f"{target.url}{path}"
    try:
        return session.request(method, url, auth=target.auth, verify=target.verify,
                               timeout=(CONNECT_TIMEOUT_S, 60.0), **kwargs)
    except requests.Timeout as error:
        raise TransientError(f"{method} {url} timed out: {error}") from error
    except requests.RequestException as error:
        raise TransientError(f"{method} {url} failed: {error}") from error


def source_machine_of(session: requests.Session, target: OrthancTarget, instance_id: str) -> str | None:
    """Return the SourceMachine metadata of INSTANCE_ID, or None when it has none."""
    path = f"/instances/{instance_id}/metadata/{SOURCE_MACHINE_METADATA}"
    response = _request(session, "GET", target, path)
    if response.status_code == 404:
        return None
    if not response.ok:
        _raise_for_status(response, f"GET {path}")
    return response.text


def set_source_machine(session: requests.Session, target: OrthancTarget, instance_id: str, machine_id: str) -> None:
    """Write MACHINE_ID as the SourceMachine metadata of INSTANCE_ID.

    Raises InstanceNotFound when Orthanc has no instance INSTANCE_ID.
    """
    path = f"/instances/{instance_id}/metadata/{SOURCE_MACHINE_METADATA}"
    response = _request(session, "PUT", target, path, data=machine_id.encode("utf-8"),
                        headers={"Content-Type": "text/plain"})
    if response.status_code == 404:
        message, _ = _error_summary(response)
        raise InstanceNotFound(f"PUT {path} returned HTTP 404: {message}")
    if not response.ok:
        _raise_for_status(response, f"PUT {path}")


def find_instance(session: requests.Session, target: OrthancTarget, sop_instance_uid: str) -> str | None:
    """Return the Orthanc ID of the instance with SOP_INSTANCE_UID, or None when Orthanc has none.

    NOTE: when two studies hold the same SOP Instance UID, the first one Orthanc lists is returned.
    """
    response = _request(session, "POST", target, "/tools/lookup", data=sop_instance_uid.encode("ascii", "replace"))
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


def stored_md5(session: requests.Session, target: OrthancTarget, instance_id: str) -> str:
    """Return the MD5 that Orthanc computed for the stored DICOM file of INSTANCE_ID."""
    path = f"/instances/{instance_id}/attachments/dicom/md5"
    response = _request(session, "GET", target, path)
    if not response.ok:
        _raise_for_status(response, f"GET {path}")
    return response.text.strip().strip('"')


def stored_dataset_md5(session: requests.Session, target: OrthancTarget, instance_id: str) -> str:
    """Return the MD5 of the data set of INSTANCE_ID's stored file, without its file meta information.

    Orthanc writes its own file meta information for an instance received by C-STORE, so
    only the data set can match the sent file. The file is streamed, never held in memory.
    """
    path = f"/instances/{instance_id}/file"
    url = f"{target.url}{path}"
    try:
        with session.get(url, auth=target.auth, verify=target.verify, stream=True,
                         timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as response:
            if not response.ok:
                _raise_for_status(response, f"GET {path}")
            return _dataset_md5(response.iter_content(BODY_BLOCK))
    except requests.RequestException as error:
        raise TransientError(f"GET {url} failed: {error}") from error


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


def delete_instance(session: requests.Session, target: OrthancTarget, instance_id: str) -> None:
    """Delete INSTANCE_ID from Orthanc."""
    path = f"/instances/{instance_id}"
    response = _request(session, "DELETE", target, path)
    if not response.ok and response.status_code != 404:
        _raise_for_status(response, f"DELETE {path}")
