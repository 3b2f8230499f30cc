"""Drop real DICOM files on the lab scanners and report where each one landed.

Each scanner receives files of its own modality from the test files in
pydicom's wheel, plus one deliberately broken file; the report counts files
dropped, instances in Orthanc with the scanner's identity, studies in MongoDB
attributed to it, and files in quarantine. Exit status 0 means every file is
accounted for.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import pydicom
import pymongo
import requests

from dicomfleet import credentials, render
from dicomfleet.inventory import InventoryError, Machine, Site, load_site
from dicomfleet.pyinfra_inventory import connection_data

log = logging.getLogger(__name__)

# Broken files pydicom ships on purpose, one per modality the lab uses, named
# as a scanner might name them. Each must end in quarantine.
BROKEN_FILES = {
    "CT": ("README.txt", "export_notes.dcm"),
    "MR": ("MR_truncated.dcm", "MR_truncated.dcm"),
    "CR": ("crayons.icc", "color_profile.dcm"),
}


@dataclasses.dataclass
class DemoFile:
    """A file the demo drops on a scanner."""

    source: Path
    name: str
    sop_instance_uid: str | None
    study_instance_uid: str | None

    @property
    def broken(self) -> bool:
        """True for the deliberately broken file."""
        return self.sop_instance_uid is None


@dataclasses.dataclass
class MachineReport:
    """What happened to one scanner's files."""

    machine: str
    dropped: int = 0
    valid: int = 0
    in_orthanc: int = 0
    wrong_source: int = 0
    studies_expected: int = 0
    studies_in_mongodb: int = 0
    broken: int = 0
    quarantined: int = 0

    @property
    def complete(self) -> bool:
        """True when every valid file is stored and every broken one quarantined."""
        return (self.in_orthanc == self.valid and self.wrong_source == 0
                and self.studies_in_mongodb == self.studies_expected
                and self.quarantined == self.broken)


def test_files_folder() -> Path:
    """Return the folder of real DICOM files shipped in pydicom's wheel."""
    return Path(pydicom.__file__).parent / "data" / "test_files"


def select_files(modality: str) -> list[DemoFile]:
    """Return pydicom's files of MODALITY, one per SOP Instance UID, plus the broken one."""
    folder = test_files_folder()
    broken_name = BROKEN_FILES.get(modality, (None, None))[0]
    chosen: list[DemoFile] = []
    seen: set[str] = set()

    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name == broken_name:
            continue
        try:
            with warnings.catch_warnings():
                # Several test files are deliberately odd; the demo only needs their UIDs.
                warnings.simplefilter("ignore")
                dataset = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if dataset.get("Modality") != modality or "SOPInstanceUID" not in dataset:
            continue
        if "StudyInstanceUID" not in dataset or "file_meta" not in dir(dataset):
            continue
        uid = str(dataset.SOPInstanceUID)
        if uid in seen:
            continue
        seen.add(uid)
        relative = path.relative_to(folder)
        name = "_".join(relative.parts)
        if not name.endswith(".dcm"):
            name += ".dcm"
        chosen.append(DemoFile(path, name, uid, str(dataset.StudyInstanceUID)))

    if broken_name:
        chosen.append(DemoFile(folder / broken_name, BROKEN_FILES[modality][1], None, None))
    return chosen


def _ssh_command(site: Site, host: str) -> list[str]:
    data = connection_data(site, host)
    command = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    if "ssh_key" in data:
        command += ["-i", data["ssh_key"]]
    if "ssh_known_hosts_file" in data:
        command += ["-o", f"UserKnownHostsFile={data['ssh_known_hosts_file']}",
                    "-o", "StrictHostKeyChecking=yes"]
    if "ssh_port" in data:
        command += ["-p", str(data["ssh_port"])]
    command.append(f"{data.get('ssh_user', 'root')}@{data['ssh_hostname']}")
    return command


def run_on_host(site: Site, host: str, script: str, stdin: bytes = b"") -> str:
    """Run SCRIPT with sh on HOST over SSH and return its output."""
    result = subprocess.run(_ssh_command(site, host) + [script], input=stdin,
                            capture_output=True, check=False, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"Command on host {host} failed with status {result.returncode}: "
                           f"{script}\n{result.stderr.decode(errors='replace').strip()}")
    return result.stdout.decode(errors="replace")


def drop_files(site: Site, machine: Machine, demo_files: list[DemoFile]) -> None:
    """Copy DEMO_FILES into MACHINE's first watch folder, as its scanner would."""
    archive = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for demo_file in demo_files:
            info = tar.gettarinfo(str(demo_file.source), arcname=demo_file.name)
            # A scanner writes new files: a fresh time makes a second demo a new export.
            info.mtime = now
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = 0o644
            with open(demo_file.source, "rb") as handle:
                tar.addfile(info, handle)
    folder = machine.watch_folders[0]
    run_on_host(site, machine.host, f"tar -C '{folder}' --no-same-owner -xf -", archive.getvalue())


def count_quarantined(site: Site, machine: Machine) -> int:
    """Return the number of files in MACHINE's quarantine, reason files excluded."""
    output = run_on_host(
        site, machine.host,
        "find /var/lib/dicomfleet-agent/quarantine -type f ! -name '*.reason.txt' 2>/dev/null | wc -l")
    return int(output.strip() or 0)


class Archive:
    """Read access to the lab's Orthanc and MongoDB, as the administrator."""

    def __init__(self, site: Site):
        self.site = site
        self.server = next(iter(site.servers.values()))
        secrets = credentials.existing_secrets(site)
        self.auth = (credentials.ADMIN_USER, secrets.orthanc_password(credentials.ADMIN_USER))
        self.machines = render.sync_machine_directory(site, self.server, secrets)
        self.session = requests.Session()
        bind = self.server.vars.get("dicomfleet_mongodb_bind", self.server.address)
        uri = self.server.mongodb_uri or f"mongodb://{bind}:{self.server.mongodb_port}/"
        self.mongodb = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
        self.database = self.mongodb[str(self.server.vars.get("dicomfleet_mongodb_database", "dicomfleet"))]

    def source_of(self, sop_instance_uid: str) -> str | None:
        """Return the machine the sync names for the stored instance, '' for none, None when it is absent."""
        answer = self.session.post(f"{self.server.url}/tools/lookup", data=sop_instance_uid,
                                   auth=self.auth, timeout=10)
        answer.raise_for_status()
        instances = [item for item in answer.json() if item["Type"] == "Instance"]
        if not instances:
            return None
        metadata = self.session.get(f"{self.server.url}/instances/{instances[0]['ID']}/metadata?expand",
                                    auth=self.auth, timeout=10)
        metadata.raise_for_status()
        return self.machines.resolve(metadata.json()).machine_id or ""

    def studies_of(self, machine_id: str, study_uids: set[str]) -> int:
        """Return how many of STUDY_UIDS have a MongoDB record attributed to MACHINE_ID."""
        return self.database.studies.count_documents(
            {"studyInstanceUID": {"$in": sorted(study_uids)}, "sourceMachine": machine_id})


def measure(site: Site, archive: Archive, machine: Machine, demo_files: list[DemoFile],
            quarantined_before: int) -> MachineReport:
    """Count where MACHINE's demo files are now.

    QUARANTINED_BEFORE is the quarantine's file count before the drop, so a
    second demo run counts only its own broken file.
    """
    report = MachineReport(machine=machine.id, dropped=len(demo_files))
    studies = set()
    for demo_file in demo_files:
        if demo_file.broken:
            report.broken += 1
            continue
        report.valid += 1
        studies.add(demo_file.study_instance_uid)
        source = archive.source_of(demo_file.sop_instance_uid)
        if source is None:
            continue
        report.in_orthanc += 1
        if source != machine.id:
            report.wrong_source += 1
    report.studies_expected = len(studies)
    report.studies_in_mongodb = archive.studies_of(machine.id, studies)
    report.quarantined = count_quarantined(site, machine) - quarantined_before
    return report


def format_table(reports: list[MachineReport]) -> str:
    """Return the reports as a fixed-width table."""
    header = ("machine", "dropped", "valid", "in Orthanc", "wrong source",
              "studies", "in MongoDB", "broken", "quarantined", "result")
    rows = [header]
    for r in reports:
        rows.append((r.machine, r.dropped, r.valid, r.in_orthanc, r.wrong_source,
                     r.studies_expected, r.studies_in_mongodb, r.broken, r.quarantined,
                     "complete" if r.complete else "INCOMPLETE"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(value).ljust(width) for value, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def run_demo(site: Site, timeout: float) -> tuple[bool, list[MachineReport]]:
    """Drop the files on every agent scanner and wait until all are accounted for."""
    archive = Archive(site)
    plan: dict[str, list[DemoFile]] = {}
    quarantined_before: dict[str, int] = {}
    for machine in site.machines.values():
        if not machine.runs_agent:
            continue
        demo_files = select_files(machine.modality)
        plan[machine.id] = demo_files
        quarantined_before[machine.id] = count_quarantined(site, machine)
        drop_files(site, machine, demo_files)
        print(f"Dropped {len(demo_files)} files on {machine.id} ({machine.modality}) "
              f"into {machine.host}:{machine.watch_folders[0]}")

    stable_age = next(iter(site.servers.values())).vars.get("dicomfleet_orthanc_stable_age", 60)
    print(f"Waiting for Orthanc and MongoDB (a study is stable {stable_age} s after its last image)...")
    deadline = time.monotonic() + timeout
    while True:
        reports = [measure(site, archive, site.machines[mid], files, quarantined_before[mid])
                   for mid, files in plan.items()]
        if all(r.complete for r in reports) or time.monotonic() > deadline:
            break
        time.sleep(3)
    return all(r.complete for r in reports), reports


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet demo", description=__doc__.splitlines()[0])
    parser.add_argument("inventory", help="a deployed lab inventory, for example inventory/lab.yml")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for every file to be accounted for (default 300)")
    return parser


def main(args: list[str] | None = None) -> int:
    options = _build_parser().parse_args(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    try:
        site = load_site(options.inventory)
    except InventoryError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 1

    started = time.monotonic()
    complete, reports = run_demo(site, options.timeout)
    print()
    print(format_table(reports))
    print()
    if complete:
        print(f"Every file is accounted for ({time.monotonic() - started:.0f} s).")
        return 0
    print(f"Some files are not accounted for after {options.timeout:.0f} s: see the rows marked "
          "INCOMPLETE, then `journalctl -u dicomfleet-agent` on the scanner and "
          "`journalctl -u dicomfleet-sync` on the central host.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
