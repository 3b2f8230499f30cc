"""Read Orthanc's REST API for the sync: change feed pages, studies, series and instances.

Written against Orthanc 1.10.1, whose ``/changes`` does not block and has no type filter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import requests
import requests.adapters
from urllib3.util.retry import Retry

from dicomfleet.sync.config import OrthancSource

# Seconds to connect, and to wait for a response (a large study's series list can take a while).
TIMEOUT_S = (5.0, 60.0)


class OrthancUnavailable(Exception):
    """Raised when Orthanc cannot respond now: connection refused, timeout or a 5xx status."""


class OrthancAuthenticationFailed(OrthancUnavailable):
    """Raised when Orthanc rejects the sync's user name or password (HTTP 401 or 403)."""


class ResourceNotFound(Exception):
    """Raised when Orthanc responds with 404: the study, series or instance is gone."""


class OrthancRequestError(Exception):
    """Raised when Orthanc rejects a request (another 4xx status) or returns a body that is not JSON."""


@dataclasses.dataclass(frozen=True)
class Change:
    """One entry of Orthanc's change feed."""

    seq: int
    change_type: str
    resource_type: str
    id: str
    date: str

    def fingerprint(self) -> dict[str, Any]:
        """Return the fields that identify this change in one Orthanc database."""
        return {"seq": self.seq, "changeType": self.change_type, "id": self.id, "date": self.date}


@dataclasses.dataclass(frozen=True)
class ChangePage:
    """One response of ``GET /changes``: the changes after ``since``, whether that was all, and Last."""

    changes: list[Change]
    done: bool
    last: int


class OrthancClient:
    """A keep-alive REST session with one Orthanc server, authenticated as the sync's user."""

    def __init__(self, source: OrthancSource, password: str):
        self.source = source
        self.session = requests.Session()
        self.session.auth = (source.username, password)
        # Orthanc closes idle keep-alive connections after about a second
        # (KeepAliveTimeout), so a poll can meet a connection closed under it.
        # One immediate retry on a fresh connection covers that race; a real
        # outage fails again and goes to the caller's backoff.
        immediate_retry = Retry(total=1, connect=1, read=1, status=0, other=0, backoff_factor=0,
                                allowed_methods={"GET"}, raise_on_status=False)
        self.session.mount("http://", requests.adapters.HTTPAdapter(max_retries=immediate_retry))
        self.session.mount("https://", requests.adapters.HTTPAdapter(max_retries=immediate_retry))
        self.session.headers["Accept"] = "application/json"

    def __repr__(self) -> str:
        return f"OrthancClient({self.source.name!r}, {self.source.url!r})"

    @property
    def label(self) -> str:
        """The server's name and URL, for log lines."""
        return f"Orthanc {self.source.name} at {self.source.url}"

    def close(self) -> None:
        """Close the keep-alive connections."""
        self.session.close()

    def get_json(self, path: str) -> Any:
        """GET PATH (with its query string) and return the decoded JSON response."""
        url = self.source.url + path
        try:
            response = self.session.get(url, timeout=TIMEOUT_S)
        except (requests.ConnectionError, requests.Timeout) as error:
            raise OrthancUnavailable(f"GET {path} failed: {error}") from error

        if response.status_code in (401, 403):
            raise OrthancAuthenticationFailed(
                f"GET {path} returned HTTP {response.status_code}: Orthanc rejected the user "
                f"{self.source.username!r}; check its password (credential {self.source.credential!r}) "
                "against Orthanc's RegisteredUsers")
        if response.status_code == 404:
            raise ResourceNotFound(f"GET {path} returned HTTP 404")
        if response.status_code >= 500:
            raise OrthancUnavailable(f"GET {path} returned HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise OrthancRequestError(f"GET {path} returned HTTP {response.status_code}: {response.text[:200]}")

        try:
            return response.json()
        except ValueError as error:
            raise OrthancRequestError(f"GET {path} returned a body that is not JSON: {response.text[:200]!r}") from error

    def changes(self, since: int, limit: int) -> ChangePage:
        """Return up to LIMIT changes with a sequence number above SINCE."""
        data = self.get_json(f"/changes?since={since}&limit={limit}")
        changes = [
            Change(seq=int(entry["Seq"]), change_type=str(entry["ChangeType"]),
                   resource_type=str(entry["ResourceType"]), id=str(entry["ID"]), date=str(entry.get("Date", "")))
            for entry in data.get("Changes", [])
        ]
        return ChangePage(changes=changes, done=bool(data.get("Done", True)), last=int(data.get("Last", 0)))

    def study(self, study_id: str) -> dict[str, Any]:
        """Return ``/studies/{id}``: main DICOM tags, patient tags, series ids, LastUpdate, IsStable."""
        return self.get_json(f"/studies/{study_id}")

    def study_series(self, study_id: str) -> list[dict[str, Any]]:
        """Return the study's series, each with its main DICOM tags and instance ids."""
        return self.get_json(f"/studies/{study_id}/series")

    def study_statistics(self, study_id: str) -> dict[str, Any]:
        """Return ``/studies/{id}/statistics`` (CountSeries, CountInstances, sizes)."""
        return self.get_json(f"/studies/{study_id}/statistics")

    def instance_metadata(self, instance_id: str) -> dict[str, str]:
        """Return the instance's metadata: RemoteAET, RemoteIP, HttpUsername, ReceptionDate, SourceMachine..."""
        return self.get_json(f"/instances/{instance_id}/metadata?expand")

    def studies_page(self, since: int, limit: int) -> list[dict[str, Any]]:
        """Return up to LIMIT studies, expanded, starting at index SINCE of Orthanc's study list."""
        return self.get_json(f"/studies?expand&since={since}&limit={limit}")
