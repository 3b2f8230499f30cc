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


def _parse_changes(data: dict[str, Any]) -> list[Change]:
    return [
        Change(seq=int(entry["Seq"]), change_type=str(entry["ChangeType"]),
               resource_type=str(entry["ResourceType"]), id=str(entry["ID"]), date=str(entry.get("Date", "")))
        for entry in data.get("Changes", [])
    ]


class OrthancClient:
    """A keep-alive REST session with one Orthanc server, authenticated as the sync's user."""

    def __init__(self, source: OrthancSource, password: str):
        self.source = source
        self.session = requests.Session()
        self.session.auth = (source.username, password)
        # Orthanc closes idle keep-alive connections after about a second
        # (KeepAliveTimeout), so a poll can meet a connection closed under it.
        # One immediate retry on a fresh connection covers that race; a real
        # outage fails again and goes to the caller's backoff. The only POST the
        # sync sends is /tools/bulk-content, which reads and changes nothing.
        immediate_retry = Retry(total=1, connect=1, read=1, status=0, other=0, backoff_factor=0,
                                allowed_methods={"GET", "POST"}, raise_on_status=False)
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
        return self._request_json("GET", path, None)

    def post_json(self, path: str, body: Any) -> Any:
        """POST the JSON BODY to PATH and return the decoded JSON response."""
        return self._request_json("POST", path, body)

    def _request_json(self, method: str, path: str, body: Any) -> Any:
        url = self.source.url + path
        try:
            response = self.session.request(method, url, json=body, timeout=TIMEOUT_S)
        except (requests.ConnectionError, requests.Timeout) as error:
            raise OrthancUnavailable(f"{method} {path} failed: {error}") from error

        if response.status_code in (401, 403):
            raise OrthancAuthenticationFailed(
                f"{method} {path} returned HTTP {response.status_code}: Orthanc rejected the user "
                f"{self.source.username!r}; check its password (credential {self.source.credential!r}) "
                "against Orthanc's RegisteredUsers")
        if response.status_code == 404:
            raise ResourceNotFound(f"{method} {path} returned HTTP 404")
        if response.status_code >= 500:
            raise OrthancUnavailable(f"{method} {path} returned HTTP {response.status_code}: {response.text[:200]}")
        if response.status_code >= 400:
            raise OrthancRequestError(f"{method} {path} returned HTTP {response.status_code}: {response.text[:200]}")

        try:
            return response.json()
        except ValueError as error:
            raise OrthancRequestError(f"{method} {path} returned a body that is not JSON: {response.text[:200]!r}") from error

    def changes(self, since: int, limit: int) -> ChangePage:
        """Return up to LIMIT changes with a sequence number above SINCE."""
        data = self.get_json(f"/changes?since={since}&limit={limit}")
        return ChangePage(changes=_parse_changes(data), done=bool(data.get("Done", True)),
                          last=int(data.get("Last", 0)))

    def last_change(self) -> Change | None:
        """Return the newest change of the feed, or None when the feed is empty."""
        changes = _parse_changes(self.get_json("/changes?last"))
        return changes[-1] if changes else None

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

    def bulk_content(self, resource_ids: list[str], level: str, metadata: bool = False) -> list[dict[str, Any]]:
        """Return the resources at LEVEL within or above RESOURCE_IDS, expanded, in no particular order.

        One ``POST /tools/bulk-content`` replaces a GET per resource. LEVEL is
        "Study", "Series" or "Instance". With METADATA each resource also
        carries its metadata, as ``/metadata?expand`` returns it (checked on
        Orthanc 1.10.1). Orthanc leaves out an id it does not know instead of failing.
        """
        body = {"Resources": resource_ids, "Level": level, "Metadata": metadata}
        return self.post_json("/tools/bulk-content", body)

    def study_ids(self) -> list[str]:
        """Return the id of every study, in one request of about 50 bytes per study."""
        return self.get_json("/studies")

    def studies_page(self, since: int, limit: int) -> list[dict[str, Any]]:
        """Return up to LIMIT studies, expanded, starting at index SINCE of Orthanc's study list."""
        return self.get_json(f"/studies?expand&since={since}&limit={limit}")
