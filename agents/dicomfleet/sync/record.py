"""Read one study from Orthanc and build its MongoDB record in the viewer's camelCase shape.

Absent or empty DICOM tags are stored as null; Orthanc has already converted
names from the study's character set to UTF-8.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Any

from dicomfleet.sync.config import PATIENT_ID_PLACEHOLDER, OrthancSource, RecordPolicy
from dicomfleet.sync.orthanc import OrthancClient, ResourceNotFound
from dicomfleet.sync.provenance import InstanceSource, MachineDirectory, StudySources

log = logging.getLogger(__name__)

# DICOM modality defined terms for objects without images of their own.
# A study's main modality is one of these only when the study has nothing else.
NON_IMAGE_MODALITIES = frozenset({"PR", "SR", "KO", "DOC", "REG", "SEG", "RTSTRUCT", "RTPLAN", "RTRECORD"})

# Instances per /tools/bulk-content request for metadata. Orthanc 1.10.1 returns
# about 1 KB of JSON per CT instance, so a response stays near 1 MB.
BULK_INSTANCES = 1000


@dataclasses.dataclass
class StudySnapshot:
    """Everything read from Orthanc about one study at one moment."""

    orthanc_id: str
    study: dict[str, Any]
    series: list[dict[str, Any]]
    # Metadata per instance id, for the instances that still existed when read.
    instance_metadata: dict[str, dict[str, str]]

    @property
    def study_instance_uid(self) -> str:
        """The study's StudyInstanceUID."""
        return str(self.study.get("MainDicomTags", {}).get("StudyInstanceUID", ""))


def read_study(client: OrthancClient, orthanc_id: str) -> StudySnapshot:
    """Read the study ORTHANC_ID, its series and every instance's metadata.

    Orthanc's main tags of the study, patient and series carry every field of
    the record (Orthanc 1.10.1 keeps StationName at series level), so no
    instance's full tag set is read. Raises ResourceNotFound when the study
    itself is gone. An instance deleted while it is read is left out.
    """
    study = client.study(orthanc_id)
    series = client.study_series(orthanc_id)

    instance_ids = [instance_id for entry in series for instance_id in entry.get("Instances", [])]
    metadata: dict[str, dict[str, str]] = {}
    for instance_id in instance_ids:
        try:
            metadata[instance_id] = client.instance_metadata(instance_id)
        except ResourceNotFound:
            log.info("Instance %s of study %s was deleted while the sync read it.", instance_id, orthanc_id)

    return StudySnapshot(orthanc_id=orthanc_id, study=study, series=series, instance_metadata=metadata)


def read_studies(client: OrthancClient, orthanc_ids: list[str]) -> dict[str, StudySnapshot]:
    """Read the studies ORTHANC_IDS as read_study does, with a few ``/tools/bulk-content`` requests in all.

    Returns a snapshot per study that Orthanc still has; a study deleted
    before it is read is left out. The three levels are read one after the
    other, so an instance deleted in between is left out, as in read_study.
    """
    studies = client.bulk_content(orthanc_ids, "Study")
    series = client.bulk_content(orthanc_ids, "Series")

    series_of: dict[str, list[dict[str, Any]]] = {study["ID"]: [] for study in studies}
    for entry in series:
        parent = series_of.get(entry.get("ParentStudy"))
        if parent is not None:
            parent.append(entry)

    instance_ids = [instance_id for entries in series_of.values()
                    for entry in entries for instance_id in entry.get("Instances", [])]
    metadata: dict[str, dict[str, str]] = {}
    for start in range(0, len(instance_ids), BULK_INSTANCES):
        chunk = instance_ids[start:start + BULK_INSTANCES]
        for instance in client.bulk_content(chunk, "Instance", metadata=True):
            if "Metadata" in instance:
                metadata[instance["ID"]] = instance["Metadata"]
                continue
            # An Orthanc whose /tools/bulk-content has no Metadata option (1.10.1 has it) leaves it out.
            try:
                metadata[instance["ID"]] = client.instance_metadata(instance["ID"])
            except ResourceNotFound:
                pass

    snapshots = {}
    for study in studies:
        study_id = study["ID"]
        study_metadata = {}
        for entry in series_of[study_id]:
            for instance_id in entry.get("Instances", []):
                if instance_id in metadata:
                    study_metadata[instance_id] = metadata[instance_id]
                else:
                    log.info("Instance %s of study %s was deleted while the sync read it.", instance_id, study_id)
        snapshots[study_id] = StudySnapshot(orthanc_id=study_id, study=study, series=series_of[study_id],
                                            instance_metadata=study_metadata)
    return snapshots


def _text(tags: dict[str, Any], name: str) -> str | None:
    """Return the tag NAME as stripped text, or None when it is absent or empty."""
    value = tags.get(name)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def parse_orthanc_date(value: str | None) -> datetime.datetime | None:
    """Parse Orthanc's UTC timestamp ``YYYYMMDDTHHMMSS`` (ReceptionDate, LastUpdate), or return None."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.strptime(value, "%Y%m%dT%H%M%S")
    except ValueError:
        return None
    return parsed.replace(tzinfo=datetime.timezone.utc)


def _series_number(entry: dict[str, Any]) -> tuple[int, str]:
    tags = entry.get("MainDicomTags", {})
    try:
        number = int(str(tags.get("SeriesNumber", "")).strip())
    except ValueError:
        number = 2**31
    return (number, str(tags.get("SeriesInstanceUID", "")))


def main_modality(series: list[dict[str, Any]]) -> str | None:
    """Return the modality of the series with the most instances, preferring image modalities."""
    best: tuple[bool, int] | None = None
    chosen = None
    for entry in series:
        modality = _text(entry.get("MainDicomTags", {}), "Modality")
        if modality is None:
            continue
        rank = (modality not in NON_IMAGE_MODALITIES, len(entry.get("Instances", [])))
        if best is None or rank > best:
            best = rank
            chosen = modality
    return chosen


@dataclasses.dataclass
class BuiltRecord:
    """A study record ready to upsert, with the source summary behind it for logging."""

    fields: dict[str, Any]
    sources: StudySources


def _station_name(series: list[dict[str, Any]]) -> str | None:
    """Return the StationName of the first series, in series number order, that has one."""
    for entry in sorted(series, key=_series_number):
        name = _text(entry.get("MainDicomTags", {}), "StationName")
        if name:
            return name
    return None


def build_record(snapshot: StudySnapshot, source: OrthancSource, policy: RecordPolicy,
                 directory: MachineDirectory) -> BuiltRecord:
    """Build the MongoDB record of SNAPSHOT; createdAt, updatedAt and deletion fields are left to the store."""
    study_tags = snapshot.study.get("MainDicomTags", {})
    patient_tags = snapshot.study.get("PatientMainDicomTags", {})

    # Reception order decides ties between machines, so sort by ReceptionDate.
    received: list[tuple[str, str, InstanceSource]] = []
    for instance_id, metadata in snapshot.instance_metadata.items():
        received.append((metadata.get("ReceptionDate", ""), instance_id, directory.resolve(metadata)))
    received.sort(key=lambda item: (item[0], item[1]))
    source_of = {instance_id: instance_source for _, instance_id, instance_source in received}
    sources = directory.summarize([instance_source for _, _, instance_source in received])

    series_list = []
    for entry in sorted(snapshot.series, key=_series_number):
        tags = entry.get("MainDicomTags", {})
        instances = entry.get("Instances", [])
        series_sources = [source_of[instance_id] for instance_id in instances if instance_id in source_of]
        series_list.append({
            "seriesInstanceUID": _text(tags, "SeriesInstanceUID"),
            "modality": _text(tags, "Modality"),
            "instanceCount": len(instances),
            "sourceMachine": directory.summarize(series_sources).machine_id,
        })

    if policy.patient_id_policy == PATIENT_ID_PLACEHOLDER:
        patient_id = policy.patient_id_placeholder
    else:
        patient_id = _text(patient_tags, "PatientID")

    reception_dates = sorted(date for date, _, _ in received if date)
    modalities = sorted({entry["modality"] for entry in series_list if entry["modality"]})

    fields = {
        "studyInstanceUID": snapshot.study_instance_uid,
        "patientID": patient_id,
        "patientName": _text(patient_tags, "PatientName"),
        "studyDate": _text(study_tags, "StudyDate"),
        "studyDescription": _text(study_tags, "StudyDescription"),
        "modality": main_modality(snapshot.series),
        "modalitiesInStudy": modalities,
        "seriesCount": len(series_list),
        "instanceCount": sum(entry["instanceCount"] for entry in series_list),
        "stationName": _station_name(snapshot.series),
        "sourceModality": sources.modality,
        "sourceAETitle": sources.ae_title,
        "sourceIP": sources.ip,
        "sourceMachine": sources.machine_id,
        "sourceMachines": sources.machine_ids,
        "orthancStudyId": snapshot.orthanc_id,
        "orthancName": source.name,
        "remoteOrthancUrl": source.public_url,
        "orthancLastUpdate": snapshot.study.get("LastUpdate"),
        "series": series_list,
        "firstReceivedAt": parse_orthanc_date(reception_dates[0]) if reception_dates else None,
        "lastReceivedAt": parse_orthanc_date(reception_dates[-1]) if reception_dates else None,
    }
    return BuiltRecord(fields=fields, sources=sources)
