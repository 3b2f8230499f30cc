"""Check one machine's setup end to end: ``dicomfleet check INVENTORY MACHINE``.

It checks that the machine's host reaches Orthanc with the machine's own
credentials. It drops a synthetic test image (patient DICOMFLEET^TEST, a fresh
Study Instance UID) into the machine's watch folder over SSH. It waits until
Orthanc stores the image with the machine's identity and MongoDB records its
study with the machine as source. Then it removes the image from the watch
folder, Orthanc and MongoDB. Each step prints PASS, FAIL or SKIP, and the exit
status is 0 when no step failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pydicom
import pymongo
import pymongo.errors
import requests
from pydicom.uid import generate_uid

from dicomfleet import credentials, demo, proxy, tls
from dicomfleet.inventory import INGEST_DICOM, TRANSPORT_CSTORE, InventoryError, Machine, Site, load_site

log = logging.getLogger(__name__)

TEST_PATIENT_NAME = "DICOMFLEET^TEST"
TEST_PATIENT_ID = "DICOMFLEET-TEST"
TEST_DESCRIPTION = "dicomfleet check: test image, safe to delete"

# Templates from pydicom's test files, per modality; other modalities use the CT image.
TEMPLATES = {"MR": "MR_small.dcm"}
DEFAULT_TEMPLATE = "CT_small.dcm"

PASS = "PASS"
FAIL = "FAIL"
SKIP = "SKIP"


@dataclasses.dataclass
class StepResult:
    """The outcome of one step, as printed."""

    name: str
    outcome: str
    detail: str


@dataclasses.dataclass
class TestImage:
    """The synthetic image sent through the machine's ingest path."""

    data: bytes
    study_instance_uid: str
    sop_instance_uid: str
    file_name: str


def make_test_image(machine: Machine) -> TestImage:
    """Return a DICOM file marked as a test, with fresh study, series and SOP Instance UIDs."""
    template = TEMPLATES.get(machine.modality, DEFAULT_TEMPLATE)
    dataset = pydicom.dcmread(demo.test_files_folder() / template)
    study_uid = generate_uid()
    sop_uid = generate_uid()
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = sop_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
    dataset.PatientName = TEST_PATIENT_NAME
    dataset.PatientID = TEST_PATIENT_ID
    dataset.StudyDescription = TEST_DESCRIPTION
    dataset.SeriesDescription = TEST_DESCRIPTION
    dataset.ImageComments = f"dicomfleet check of machine {machine.id}"
    dataset.StudyDate = datetime.date.today().strftime("%Y%m%d")

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return TestImage(data=buffer.getvalue(), study_instance_uid=study_uid, sop_instance_uid=sop_uid,
                     file_name=f"dicomfleet-check-{sop_uid}.dcm")


def run_on_host(site: Site, host: str, script: str, stdin: bytes = b"") -> str:
    """Run the shell SCRIPT on the inventory HOST and return its output.

    A host with ``ansible_connection: local`` runs it on this machine, as
    Ansible would; any other host is reached over SSH with its inventory variables.
    """
    if site.hosts[host].vars.get("ansible_connection") == "local":
        result = subprocess.run(["sh", "-c", script], input=stdin, capture_output=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"Command on host {host} failed with status {result.returncode}: "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode(errors="replace")
    return demo.run_on_host(site, host, script, stdin)


# Run on the machine's host with its python3: GET /system at the agent's own URL with
# the machine's Orthanc user, the password read from the root-only credential file,
# and over HTTPS the site CA that the agent trusts.
_REACH_SCRIPT = """
import base64, ssl, sys, urllib.error, urllib.request
url, user, password_file, ca_file = sys.argv[1:5]
context = ssl.create_default_context(cafile=ca_file) if ca_file else None
try:
    password = open(password_file, encoding="ascii").read().strip()
except OSError as error:
    sys.exit("cannot read " + password_file + ": " + str(error))
request = urllib.request.Request(url + "/system")
token = base64.b64encode((user + ":" + password).encode()).decode()
request.add_header("Authorization", "Basic " + token)
try:
    with urllib.request.urlopen(request, timeout=10, context=context) as answer:
        print("HTTP", answer.status)
except urllib.error.HTTPError as error:
    sys.exit("Orthanc answered HTTP " + str(error.code) + (": it rejects the machine's credentials" if error.code == 401 else ""))
except OSError as error:
    sys.exit("unreachable: " + str(error))
"""


class Checker:
    """Runs the steps for one machine and keeps what later steps and the clean-up need."""

    def __init__(self, site: Site, machine: Machine, timeout: float, password_file: str | None = None):
        self.site = site
        self.machine = machine
        self.timeout = timeout
        self.server = site.server_of(machine)
        secrets = credentials.existing_secrets(site)
        self.admin_auth = (credentials.ADMIN_USER, secrets.orthanc_password(credentials.ADMIN_USER))
        self.password_file = password_file or f"/etc/dicomfleet/credentials/orthanc-{machine.id}.password"
        # The control machine reaches Orthanc as a browser would: through nginx when the
        # site has TLS, because Orthanc then rejects plain HTTP from other hosts.
        self.orthanc_url = proxy.public_url(site, self.server)
        self.session = requests.Session()
        self.session.auth = self.admin_auth
        if self.orthanc_url.startswith("https://"):
            self.session.verify = str(tls.ca_certificate_file(site, secrets))
            # Otherwise requests lets REQUESTS_CA_BUNDLE override the session's verify.
            self.session.trust_env = False
        bind = self.server.vars.get("dicomfleet_mongodb_bind", self.server.address)
        uri = self.server.mongodb_uri or f"mongodb://{bind}:{self.server.mongodb_port}/"
        self.mongodb = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000, tz_aware=True)
        database = str(self.server.vars.get("dicomfleet_mongodb_database", "dicomfleet"))
        self.studies = self.mongodb[database]["studies"]
        # The host whose agent watches the machine's folders: its own, or the file server of a share.
        self.agent_host = machine.agent_host or machine.host
        self.image: TestImage | None = None
        self.dropped_path: str | None = None
        self.orthanc_study_id: str | None = None

    def close(self) -> None:
        """Close the connections."""
        self.session.close()
        self.mongodb.close()

    def _wait(self, probe: Callable[[], str | None], timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while True:
            found = probe()
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(1)

    def reach_orthanc(self) -> StepResult:
        """Check that the machine's host reaches Orthanc and that Orthanc accepts the machine's credentials."""
        name = "host reaches Orthanc"
        if self.machine.ingest == INGEST_DICOM:
            answer = self.session.post(f"{self.orthanc_url}/modalities/{self.machine.id}/echo", data="{}",
                                       timeout=30)
            if answer.status_code == 200:
                return StepResult(name, PASS, f"Orthanc's C-ECHO to {self.machine.ae_title} at "
                                              f"{self.machine.address} succeeded")
            return StepResult(name, FAIL, f"Orthanc's C-ECHO to {self.machine.ae_title} at {self.machine.address} "
                                          f"failed (HTTP {answer.status_code}); is the machine on and registered?")

        url = proxy.machine_url(self.site, self.machine)
        ca_file = tls.CA_FILE if url.startswith("https://") else ""
        arguments = " ".join(shlex.quote(value) for value in
                             (url, self.machine.orthanc_username, self.password_file, ca_file))
        try:
            output = run_on_host(self.site, self.agent_host, f"python3 - {arguments}",
                                 _REACH_SCRIPT.encode())
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            return StepResult(name, FAIL, f"{self.agent_host} cannot reach {url} as user "
                                          f"{self.machine.orthanc_username}: {error}")
        return StepResult(name, PASS, f"{self.agent_host} reached {url} as user "
                                      f"{self.machine.orthanc_username} ({output.strip()})")

    def drop_image(self) -> StepResult:
        """Write the test image into the machine's first watch folder under a temporary name, then rename it."""
        name = "test image dropped in the watch folder"
        self.image = make_test_image(self.machine)
        if self.machine.ingest == INGEST_DICOM:
            return StepResult(name, SKIP, "the machine sends C-STORE itself; send a test image from its console "
                                          f"with patient name {TEST_PATIENT_NAME} to check its path")

        folder = self.machine.watch_folders[0]
        final = f"{folder.rstrip('/')}/{self.image.file_name}"
        partial = f"{folder.rstrip('/')}/.{self.image.file_name}.part"
        script = f"cat > {shlex.quote(partial)} && mv {shlex.quote(partial)} {shlex.quote(final)}"
        try:
            run_on_host(self.site, self.agent_host, script, self.image.data)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            return StepResult(name, FAIL, f"cannot write into {self.agent_host}:{folder}: {error}")
        self.dropped_path = final
        return StepResult(name, PASS, f"{self.agent_host}:{final} (Study Instance UID "
                                      f"{self.image.study_instance_uid})")

    def _lookup_instance(self) -> str | None:
        answer = self.session.post(f"{self.orthanc_url}/tools/lookup", data=self.image.sop_instance_uid, timeout=10)
        answer.raise_for_status()
        for item in answer.json():
            if item["Type"] == "Instance":
                return item["ID"]
        return None

    def seen_in_orthanc(self) -> StepResult:
        """Wait for the instance in Orthanc and compare the sender Orthanc recorded (user or AE title) with the machine."""
        name = "seen in Orthanc with the machine's identity"
        if self.dropped_path is None:
            return StepResult(name, SKIP, "no test image was dropped")
        try:
            instance_id = self._wait(self._lookup_instance, self.timeout)
        except requests.RequestException as error:
            return StepResult(name, FAIL, f"cannot query Orthanc at {self.orthanc_url}: {error}")
        if instance_id is None:
            return StepResult(name, FAIL, f"Orthanc did not receive SOP Instance UID {self.image.sop_instance_uid} "
                                          f"within {self.timeout:.0f} s; read 'journalctl -u dicomfleet-agent' "
                                          f"on {self.agent_host}")

        instance = self.session.get(f"{self.orthanc_url}/instances/{instance_id}", timeout=10).json()
        self.orthanc_study_id = self.session.get(f"{self.orthanc_url}/series/{instance['ParentSeries']}",
                                                 timeout=10).json()["ParentStudy"]
        metadata = self.session.get(f"{self.orthanc_url}/instances/{instance_id}/metadata?expand",
                                    timeout=10).json()
        # Orthanc records who sent the instance, and the sync names the machine from that.
        if self.machine.ingest == INGEST_DICOM or self.machine.transport == TRANSPORT_CSTORE:
            field, expected = "RemoteAET", self.machine.ae_title
            recorded = metadata.get(field, "")
            # Orthanc compares AE titles without regard to case, but user names must match exactly.
            matches = recorded.strip().upper() == expected.strip().upper()
        else:
            field, expected = "HttpUsername", self.machine.orthanc_username
            recorded = metadata.get(field, "")
            matches = recorded == expected
        if not matches:
            return StepResult(name, FAIL, f"instance {instance_id}: {field} is {recorded!r}, expected {expected!r}")
        return StepResult(name, PASS, f"instance {instance_id}, {field} {recorded}")

    def _record_source(self) -> str | None:
        record = self.studies.find_one({"studyInstanceUID": self.image.study_instance_uid,
                                         "deleted": {"$ne": True}})
        if record is None:
            return None
        return str(record.get("sourceMachine"))

    def seen_in_mongodb(self) -> StepResult:
        """Wait for the study's MongoDB record and compare its sourceMachine with the machine."""
        name = "recorded in MongoDB with the right source"
        if self.orthanc_study_id is None:
            return StepResult(name, SKIP, "the image is not in Orthanc")
        stable_age = float(self.server.vars.get("dicomfleet_orthanc_stable_age", 60))
        try:
            source = self._wait(self._record_source, self.timeout + stable_age)
        except pymongo.errors.PyMongoError as error:
            return StepResult(name, FAIL, f"cannot query MongoDB: {error}")
        if source is None:
            return StepResult(name, FAIL, f"no record of study {self.image.study_instance_uid} after "
                                          f"{self.timeout + stable_age:.0f} s (the study is stable {stable_age:.0f} s "
                                          "after its last image); read 'journalctl -u dicomfleet-sync'")
        if source != self.machine.id:
            return StepResult(name, FAIL, f"the record names sourceMachine {source!r}, expected {self.machine.id!r}")
        return StepResult(name, PASS, f"study {self.image.study_instance_uid}, sourceMachine {source}")

    def clean_up(self) -> StepResult:
        """Delete the test study from Orthanc and MongoDB and the file from the watch folder."""
        name = "test image removed"
        if self.image is None or self.dropped_path is None:
            return StepResult(name, SKIP, "nothing to remove")

        problems = []
        done = []
        try:
            run_on_host(self.site, self.agent_host, f"rm -f {shlex.quote(self.dropped_path)}")
            done.append("watch folder")
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            problems.append(f"cannot remove {self.dropped_path}: {error}")

        try:
            if self.orthanc_study_id is None:
                self.orthanc_study_id = self._study_of_late_instance()
            if self.orthanc_study_id is not None:
                answer = self.session.delete(f"{self.orthanc_url}/studies/{self.orthanc_study_id}", timeout=30)
                if answer.status_code not in (200, 404):
                    problems.append(f"Orthanc answered HTTP {answer.status_code} to deleting study "
                                    f"{self.orthanc_study_id}")
                else:
                    done.append("Orthanc")
        except requests.RequestException as error:
            problems.append(f"cannot delete study {self.orthanc_study_id} from Orthanc: {error}")

        try:
            self.studies.delete_many({"studyInstanceUID": self.image.study_instance_uid})
            done.append("MongoDB")
        except pymongo.errors.PyMongoError as error:
            problems.append(f"cannot delete the record of study {self.image.study_instance_uid}: {error}")

        if problems:
            return StepResult(name, FAIL, "; ".join(problems))
        return StepResult(name, PASS, "from " + ", ".join(done))

    def _study_of_late_instance(self) -> str | None:
        instance_id = self._lookup_instance()
        if instance_id is None:
            return None
        instance = self.session.get(f"{self.orthanc_url}/instances/{instance_id}", timeout=10).json()
        return self.session.get(f"{self.orthanc_url}/series/{instance['ParentSeries']}", timeout=10).json()["ParentStudy"]


def find_machine(site: Site, name: str) -> Machine | None:
    """Return the machine whose id or inventory host is NAME."""
    if name in site.machines:
        return site.machines[name]
    for machine in site.machines.values():
        if machine.host == name:
            return machine
    return None


def run_checks(site: Site, machine: Machine, timeout: float, printer: Callable[[StepResult], None],
               password_file: str | None = None) -> list[StepResult]:
    """Run every step for MACHINE, calling PRINTER after each; return the results."""
    checker = Checker(site, machine, timeout, password_file)
    results = []
    try:
        for step in (checker.reach_orthanc, checker.drop_image, checker.seen_in_orthanc, checker.seen_in_mongodb):
            result = step()
            results.append(result)
            printer(result)
        result = checker.clean_up()
        results.append(result)
        printer(result)
    finally:
        checker.close()
    return results


def _print_step(result: StepResult) -> None:
    print(f"[{result.outcome}] {result.name}: {result.detail}", flush=True)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomfleet check", description=__doc__.splitlines()[0],
                                     epilog="Exit status 0 when no step failed, 1 when one did, 2 for an invalid "
                                            "inventory or an unknown machine.")
    parser.add_argument("inventory", help="the site's inventory YAML file")
    parser.add_argument("machine", help="the machine id (or its inventory host name)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the image in Orthanc, and in MongoDB beyond Orthanc's "
                             "StableAge (default 60)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    parser.add_argument("--password-file", default=None,
                        help="the machine's Orthanc password file on its host "
                             "(default /etc/dicomfleet/credentials/orthanc-MACHINE.password, as deployed)")
    return parser


def main(args: list[str] | None = None) -> int:
    """Check the machine and return 0 when no step failed."""
    options = _build_parser().parse_args(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        site = load_site(options.inventory)
    except InventoryError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return 2
    machine = find_machine(site, options.machine)
    if machine is None:
        print(f"{options.inventory}: no machine {options.machine!r}; the machines are "
              f"{', '.join(sorted(site.machines))}.", file=sys.stderr)
        return 2

    print(f"Checking machine {machine.id} ({machine.modality}, {machine.location}), ingest {machine.ingest}, "
          f"Orthanc {proxy.public_url(site, site.server_of(machine))}", flush=True)
    results = run_checks(site, machine, options.timeout, _print_step, options.password_file)
    failed = [result for result in results if result.outcome == FAIL]
    if options.json:
        print(json.dumps([dataclasses.asdict(result) for result in results], indent=2))
    if failed:
        print(f"{len(failed)} of {len(results)} steps failed.")
        return 1
    print("Every step passed." if all(r.outcome == PASS for r in results) else "No step failed; some were skipped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
