"""Name the imaging machine each instance came from, from the metadata Orthanc keeps per instance.

Orthanc 1.10.1 records who sent each instance: HttpUsername for a REST upload (each
machine has its own Orthanc user) and RemoteAET and RemoteIP for a C-STORE (Orthanc
checks the pair against its registered modalities). The user metadata SourceMachine,
which earlier agents wrote after each upload, still wins where an instance has it.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
from typing import Iterable

from dicomfleet.sync.config import MachineEntry

BY_SOURCE_MACHINE = "SourceMachine metadata"
BY_HTTP_USERNAME = "HttpUsername"
BY_AE_TITLE_AND_IP = "RemoteAET and RemoteIP"


@dataclasses.dataclass(frozen=True)
class InstanceSource:
    """The origin of one instance: the machine found (or None) and the metadata behind it."""

    machine_id: str | None
    method: str | None
    remote_aet: str
    remote_ip: str
    http_username: str
    source_machine: str


@dataclasses.dataclass(frozen=True)
class StudySources:
    """The machines a study's instances came from; the main one sent the most instances."""

    machine_id: str | None
    machine_ids: list[str]
    ae_title: str | None
    ip: str | None
    modality: str | None
    unknown_instances: int
    # One instance without a known machine, to show in the log.
    unknown_example: InstanceSource | None


def _same_address(configured: str, remote_ip: str) -> bool:
    """Return True when REMOTE_IP is CONFIGURED, or CONFIGURED is a host name.

    NOTE: host names are not resolved (that would need DNS), so a machine
    configured by host name matches on its AE title alone. AE titles are
    unique across the fleet, and Orthanc itself checks the AE title and host
    pair of every C-STORE (DicomCheckModalityHost).
    """
    try:
        expected = ipaddress.ip_address(configured)
    except ValueError:
        return True
    try:
        return ipaddress.ip_address(remote_ip) == expected
    except ValueError:
        return False


class MachineDirectory:
    """The configured machines, indexed by id, Orthanc user name and AE title."""

    def __init__(self, machines: Iterable[MachineEntry]):
        self.by_id: dict[str, MachineEntry] = {}
        self.by_username: dict[str, MachineEntry] = {}
        self.by_ae_title: dict[str, MachineEntry] = {}
        for machine in machines:
            self.by_id[machine.id] = machine
            self.by_username[machine.username] = machine
            # Orthanc compares AE titles without regard to case by default.
            self.by_ae_title[machine.ae_title.strip().upper()] = machine

    def machine(self, machine_id: str | None) -> MachineEntry | None:
        """Return the configured machine MACHINE_ID, or None."""
        if machine_id is None:
            return None
        return self.by_id.get(machine_id)

    def resolve(self, metadata: dict[str, str]) -> InstanceSource:
        """Return the machine an instance came from, given its Orthanc metadata.

        SourceMachine metadata wins; then HttpUsername through the machines'
        Orthanc users; then RemoteAET and RemoteIP through the machines' AE
        titles and addresses. A SourceMachine value that is not a configured
        machine id is still used, because the agent that wrote it sends as
        that machine. The caller logs it.
        """
        source_machine = str(metadata.get("SourceMachine", "")).strip()
        http_username = str(metadata.get("HttpUsername", "")).strip()
        remote_aet = str(metadata.get("RemoteAET", "")).strip()
        remote_ip = str(metadata.get("RemoteIP", "")).strip()

        def found(machine_id: str | None, method: str | None) -> InstanceSource:
            return InstanceSource(machine_id=machine_id, method=method, remote_aet=remote_aet,
                                  remote_ip=remote_ip, http_username=http_username,
                                  source_machine=source_machine)

        if source_machine:
            return found(source_machine, BY_SOURCE_MACHINE)

        # NOTE: a machine removed from the inventory is no longer named from its user or AE
        # title, so a database rebuilt later records its studies without a source machine.
        machine = self.by_username.get(http_username) if http_username else None
        if machine is not None:
            return found(machine.id, BY_HTTP_USERNAME)

        machine = self.by_ae_title.get(remote_aet.upper()) if remote_aet else None
        if machine is not None and _same_address(machine.address, remote_ip):
            return found(machine.id, BY_AE_TITLE_AND_IP)

        return found(None, None)

    def summarize(self, sources: list[InstanceSource]) -> StudySources:
        """Combine the sources of a study's instances, given in order of reception.

        The main machine is the one that sent the most instances; a tie goes to
        the one that sent first. The AE title is the main machine's configured
        one, else the most frequent RemoteAET; the IP is the most frequent
        RemoteIP of the main machine's instances (of the unknown ones when no
        machine is known).
        """
        counts: collections.Counter[str] = collections.Counter()
        order: list[str] = []
        unknown = [source for source in sources if source.machine_id is None]
        for source in sources:
            if source.machine_id is None:
                continue
            if source.machine_id not in counts:
                order.append(source.machine_id)
            counts[source.machine_id] += 1

        main_id = None
        if order:
            # max() returns the first of equal counts, and ORDER is the order of reception.
            main_id = max(order, key=lambda machine_id: counts[machine_id])

        if main_id is None:
            group = unknown
        else:
            group = [source for source in sources if source.machine_id == main_id]
        machine = self.machine(main_id)

        ae_title = machine.ae_title if machine else _most_common(source.remote_aet for source in group)
        return StudySources(
            machine_id=main_id,
            machine_ids=order,
            ae_title=ae_title,
            ip=_most_common(source.remote_ip for source in group),
            modality=machine.modality if machine else None,
            unknown_instances=len(unknown),
            unknown_example=unknown[0] if unknown else None,
        )


def _most_common(values: Iterable[str]) -> str | None:
    counts = collections.Counter(value for value in values if value)
    if not counts:
        return None
    return counts.most_common(1)[0][0]
