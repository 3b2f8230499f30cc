"""Helpers for the archive's lab tests: the lab site's inventory, the cluster's shared storage, DICOM files.

The lab site ``archlab`` uses 127.0.10.120 to 127.0.10.139 and its own ports, so it
never meets another lab: a standalone Orthanc (``vault``), a two-node cluster
(``n1``, ``n2``), the host that runs the cluster's PostgreSQL and balancer (``db``),
and a file server (``fs``) whose agent serves the share machines.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import time
from pathlib import Path

import pydicom
import pydicom.data
import yaml
from pydicom.uid import generate_uid

from dicomfleet import lab

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "inventory" / "example-hospital.yml"
LAB = ROOT / "inventory" / "lab.yml"

SITE = "archlab"
VAULT = "127.0.10.120"
DB = "127.0.10.125"
FILE_SERVER = "127.0.10.130"
NODES = {"n1": "127.0.10.126", "n2": "127.0.10.127"}
# Machines that are never booted: their addresses only appear in Orthanc's and nginx's settings.
SHARE_MACHINES = {"share1": "127.0.10.131", "share2": "127.0.10.132", "ct1": "127.0.10.133"}
DX_WRONG_ADDRESS = "127.0.10.139"

VAULT_PORTS = {"http": 8240, "dicom": 4440, "https": 8640, "mongodb": 27220}
NODE_PORTS = {
    "n1": {"http": 8246, "dicom": 4446, "https": 8646},
    "n2": {"http": 8247, "dicom": 4447, "https": 8647},
}
CLUSTER_MONGODB_PORT = 27226
BALANCER_PORT = 8743
POSTGRESQL_PORT = 5532
CLUSTER_STORAGE = "/srv/dicomfleet/storage"
SHARED_STORAGE = Path("/var/lib/dicomfleet-lab-shared") / SITE / "storage"

VAULT_URL = f"https://{VAULT}:{VAULT_PORTS['https']}"
BALANCER_URL = f"https://{DB}:{BALANCER_PORT}"


def inventory_document(with_share2: bool = True) -> dict:
    """Return the archlab inventory; without WITH_SHARE2 the machine share2 is retired."""
    common = {
        "dicomfleet_orthanc_stable_age": 2,
        "dicomfleet_mongodb_uri": "",
    }
    vault = {
        "ansible_host": VAULT,
        "dicomfleet_orthanc_name": "vault",
        "dicomfleet_orthanc_aet": "VAULT",
        "dicomfleet_orthanc_http_port": VAULT_PORTS["http"],
        "dicomfleet_orthanc_dicom_port": VAULT_PORTS["dicom"],
        "dicomfleet_https_port": VAULT_PORTS["https"],
        "dicomfleet_mongodb_port": VAULT_PORTS["mongodb"],
        "dicomfleet_mongodb_bind": VAULT,
        "dicomfleet_dashboard_port": 8250,
        "dicomfleet_orthanc_plugin_packages": ["orthanc-dicomweb", "orthanc-webviewer", "orthanc-gdcm"],
        "dicomfleet_viewer_networks": ["127.0.10.0/28"],
        **common,
    }
    nodes = {}
    for name, address in NODES.items():
        ports = NODE_PORTS[name]
        nodes[name] = {
            "ansible_host": address,
            "dicomfleet_orthanc_name": "main",
            "dicomfleet_orthanc_aet": f"MAIN_{name.upper()}",
            "dicomfleet_orthanc_http_port": ports["http"],
            "dicomfleet_orthanc_dicom_port": ports["dicom"],
            "dicomfleet_https_port": ports["https"],
            "dicomfleet_dashboard_port": 8250 + int(name[1]),
            **common,
        }

    machines = {
        "share1": {"dicomfleet_ingest": "share", "dicomfleet_orthanc": "vault", "dicomfleet_modality": "CT"},
        "share2": {"dicomfleet_ingest": "share", "dicomfleet_orthanc": "vault", "dicomfleet_modality": "MR"},
        "ct1": {"dicomfleet_ingest": "share", "dicomfleet_orthanc": "n1", "dicomfleet_modality": "CT"},
    }
    scanners = {}
    for name, settings in machines.items():
        if name == "share2" and not with_share2:
            continue
        scanners[name] = {
            "ansible_host": SHARE_MACHINES[name],
            "dicomfleet_machine_id": name,
            "dicomfleet_ae_title": name.upper(),
            "dicomfleet_location": f"Archive lab, {name}",
            "dicomfleet_watch_folders": [f"/srv/share/{name}"],
            "dicomfleet_share_host": "fs",
            **settings,
        }
    # dx1 sends from the control machine, whose connections to lab addresses come from 127.0.0.1.
    scanners["dx1"] = {"ansible_host": "127.0.0.1", "dicomfleet_machine_id": "dx1",
                       "dicomfleet_ae_title": "DX_ROOM1", "dicomfleet_modality": "DX",
                       "dicomfleet_location": "Archive lab, DX room 1", "dicomfleet_ingest": "dicom",
                       "dicomfleet_orthanc": "vault"}
    scanners["dx2"] = {"ansible_host": DX_WRONG_ADDRESS, "dicomfleet_machine_id": "dx2",
                       "dicomfleet_ae_title": "DX_ROOM2", "dicomfleet_modality": "DX",
                       "dicomfleet_location": "Archive lab, DX room 2", "dicomfleet_ingest": "dicom",
                       "dicomfleet_orthanc": "vault"}

    return {
        "all": {
            "vars": {
                "dicomfleet_site": SITE,
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(lab.key_path()),
                "dicomfleet_lab": True,
                "dicomfleet_imaging_vlan": 120,
                "dicomfleet_imaging_subnet": "127.0.10.0/24",
            },
            "children": {
                "central": {
                    "hosts": {"vault": vault},
                    "children": {
                        "cluster_main": {
                            "vars": {
                                "dicomfleet_cluster": "main",
                                "dicomfleet_cluster_balancer": "db",
                                "dicomfleet_cluster_https_port": BALANCER_PORT,
                                "dicomfleet_postgresql_host": "db",
                                "dicomfleet_postgresql_port": POSTGRESQL_PORT,
                                "dicomfleet_orthanc_storage_directory": CLUSTER_STORAGE,
                                "dicomfleet_mongodb_port": CLUSTER_MONGODB_PORT,
                                "dicomfleet_mongodb_bind": NODES["n1"],
                                # A study whose last instances reached a node that stopped becomes
                                # stable on no node; the sync's reconcile records it.
                                "dicomfleet_sync_reconcile_interval_s": 20,
                            },
                            "hosts": nodes,
                        },
                    },
                },
                "cluster_services": {"hosts": {"db": {"ansible_host": DB}}},
                "fileservers": {"hosts": {"fs": {"ansible_host": FILE_SERVER,
                                                 "dicomfleet_agent_quiet_time_s": 1}}},
                "scanners": {"hosts": scanners},
            },
        }
    }


def write_inventory(folder: Path, with_share2: bool = True) -> Path:
    """Write the archlab inventory into FOLDER and return its path."""
    path = folder / ("archlab.yml" if with_share2 else "archlab-without-share2.yml")
    path.write_text(yaml.safe_dump(inventory_document(with_share2), sort_keys=False), encoding="utf-8")
    return path


PROPAGATE_ROOT = Path("/run/systemd/nspawn/propagate")


def _propagate_folder(host: str) -> Path:
    return PROPAGATE_ROOT / f"{SITE}-{host}"


def prepare_mount_propagation() -> None:
    """Make systemd-nspawn's propagation folder a shared mount, as it is on a host whose init is systemd.

    systemd-nspawn binds /run/systemd/nspawn/propagate/MACHINE into each container
    as /run/host/incoming; mounts made below it on the control machine reach
    the container only when the folder is a shared mount. Call this before
    booting the cluster's nodes.
    """
    PROPAGATE_ROOT.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mountpoint", "-q", str(PROPAGATE_ROOT)]).returncode != 0:
        subprocess.run(["mount", "--bind", str(PROPAGATE_ROOT), str(PROPAGATE_ROOT)], check=True)
    subprocess.run(["mount", "--make-shared", str(PROPAGATE_ROOT)], check=True)


def share_storage(host: str, address: str) -> None:
    """Mount the cluster's shared storage folder on the lab host HOST, as a site's NFS mount would be.

    systemd-nspawn propagates mounts made below /run/systemd/nspawn/propagate/MACHINE
    on the control machine into the container's /run/host/incoming, from where
    the host binds it at the storage path.
    """
    SHARED_STORAGE.mkdir(parents=True, exist_ok=True)
    incoming = _propagate_folder(host) / "storage"
    incoming.mkdir(exist_ok=True)
    if subprocess.run(["mountpoint", "-q", str(incoming)]).returncode != 0:
        subprocess.run(["mount", "--bind", str(SHARED_STORAGE), str(incoming)], check=True)
    # /run/host/incoming is read-only in the container, so the bind is made writable again.
    lab.ssh(address, f"mkdir -p {CLUSTER_STORAGE} && (mountpoint -q {CLUSTER_STORAGE} || "
                     f"(mount --bind /run/host/incoming/storage {CLUSTER_STORAGE} && "
                     f"mount -o remount,bind,rw {CLUSTER_STORAGE}))")


def unshare_storage(host: str) -> None:
    """Remove the control machine's side of HOST's shared storage mount."""
    incoming = _propagate_folder(host) / "storage"
    if incoming.exists() and subprocess.run(["mountpoint", "-q", str(incoming)]).returncode == 0:
        subprocess.run(["umount", "--lazy", str(incoming)], check=False)


def make_instance(study_uid: str | None = None, series_uid: str | None = None,
                  patient_id: str = "ARCHLAB") -> bytes:
    """Return CT_small.dcm from pydicom's test files with fresh UIDs, encoded as DICOM Part 10."""
    dataset = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    sop_uid = generate_uid()
    dataset.SOPInstanceUID = sop_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
    dataset.StudyInstanceUID = study_uid or generate_uid()
    dataset.SeriesInstanceUID = series_uid or generate_uid()
    dataset.PatientID = patient_id
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def md5(data: bytes) -> str:
    """Return the hexadecimal MD5 of DATA."""
    return hashlib.md5(data).hexdigest()


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "the condition"):
    """Return PREDICATE's first truthy result, polling until TIMEOUT seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def file_of(plan, path: str):
    """Return the managed file at PATH in the host plan PLAN."""
    (managed,) = [f for f in plan.files if f.path == path]
    return managed
