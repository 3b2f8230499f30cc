"""Backup and restore of a standalone Orthanc: ingest, back up, wipe, restore, then compare.

A real Orthanc (dicomfleet.localservers) stores real DICOM files; ``dicomfleet
backup`` and ``dicomfleet restore`` run on its folders as they would on a host.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from dicomfleet import backup, localservers, restore
from dicomfleet.inventory import load_site
from test_archive_support import make_instance, md5

STUDIES = 3
INSTANCES_PER_STUDY = 4


def _config(folder: Path, storage: Path, keep: int = 14) -> Path:
    path = folder / "backup.toml"
    path.write_text(
        "[orthanc]\n"
        f'storage_directory = "{storage}"\n'
        f'index_directory = "{storage}"\n'
        'owner = ""\n'
        "[index]\n"
        'kind = "sqlite"\n'
        f"keep = {keep}\n"
        "[storage]\n"
        f"keep = {keep}\n"
        "[target]\n"
        f'folder = "{folder / "backups"}"\n',
        encoding="utf-8",
    )
    return path


def _upload(orthanc: localservers.OrthancProcess, data: bytes) -> str:
    answer = requests.post(f"{orthanc.url}/instances", data=data, auth=orthanc.admin_auth, timeout=30)
    answer.raise_for_status()
    return answer.json()["ID"]


def _stored_md5s(orthanc: localservers.OrthancProcess) -> dict[str, str]:
    found = {}
    for instance in orthanc.get("/instances"):
        answer = requests.get(f"{orthanc.url}/instances/{instance}/file", auth=orthanc.admin_auth, timeout=30)
        answer.raise_for_status()
        found[instance] = md5(answer.content)
    return found


@pytest.fixture(scope="module")
def restored(tmp_path_factory):
    """Ingest real files, back up, wipe the storage, restore and start Orthanc again."""
    folder = tmp_path_factory.mktemp("backup-restore")
    inventory = localservers.write_local_inventory(folder, [])
    orthanc = localservers.OrthancProcess(load_site(inventory), folder)
    storage = folder / "orthanc-storage"
    orthanc.start()

    sent = {}
    for _ in range(STUDIES):
        study_uid = None
        for _ in range(INSTANCES_PER_STUDY):
            data = make_instance(study_uid=study_uid)
            instance = _upload(orthanc, data)
            study_uid = orthanc.get(f"/instances/{instance}/tags?simplify")["StudyInstanceUID"]
            sent[instance] = md5(data)

    config = backup.load_config(_config(folder, storage))
    with pytest.raises(backup.BackupError) as locked:
        backup.backup_index(config)

    orthanc.stop()
    # The Web viewer plugin keeps its cache here when no CachePath is set.
    (storage / "WebViewerCache").mkdir()
    (storage / "WebViewerCache" / "cache.db").write_bytes(b"cache")
    index_backup = backup.backup_index(config)
    snapshot = backup.backup_storage(config)
    shutil.rmtree(storage)

    report = restore.restore(config)
    orthanc.start()
    yield {"orthanc": orthanc, "sent": sent, "report": report, "config": config, "locked": locked.value,
           "index_backup": index_backup, "snapshot": snapshot, "folder": folder, "storage": storage}
    orthanc.stop()


def test_backup_refused_while_orthanc_runs(restored):
    assert "locked" in str(restored["locked"])


def test_backup_index_passes_integrity_check(restored):
    result = subprocess.run(["sqlite3", str(restored["index_backup"]), "PRAGMA integrity_check"],
                            capture_output=True, text=True)
    assert result.stdout.strip() == "ok"


def test_snapshot_leaves_index_out(restored):
    assert not (restored["snapshot"] / "index").exists()


def test_snapshot_leaves_plugin_cache_out(restored):
    assert not (restored["snapshot"] / "WebViewerCache").exists()


def test_snapshot_holds_every_attachment(restored):
    files = [path for path in restored["snapshot"].rglob("*") if path.is_file()]
    assert len(files) == STUDIES * INSTANCES_PER_STUDY


def test_restore_instance_count(restored):
    statistics = restored["orthanc"].get("/statistics")
    assert statistics["CountInstances"] == STUDIES * INSTANCES_PER_STUDY


def test_restore_study_count(restored):
    statistics = restored["orthanc"].get("/statistics")
    assert statistics["CountStudies"] == STUDIES


def test_restore_same_md5s(restored):
    assert _stored_md5s(restored["orthanc"]) == restored["sent"]


def test_restore_report_complete(restored):
    report = restored["report"]
    assert (report.instances, report.attachments, report.complete) == (STUDIES * INSTANCES_PER_STUDY,
                                                                         STUDIES * INSTANCES_PER_STUDY, True)


def test_restore_refuses_nonempty_storage(restored):
    with pytest.raises(backup.BackupError) as caught:
        restore.restore(restored["config"])
    assert f"{restored['storage']} is not empty" in str(caught.value)


def test_index_backups_pruned_to_keep(tmp_path, restored):
    source = restored["config"]
    config = backup.load_config(_config(tmp_path, source.storage_directory, keep=2))
    restored["orthanc"].stop()
    try:
        for name in ("20250101T000000Z", "20250102T000000Z", "20250103T000000Z"):
            backup.backup_index(config, name)
    finally:
        restored["orthanc"].start()
    kept = [path.name for path in backup.complete_backups(config.index_folder, ".sqlite3")]
    assert kept == ["index-20250102T000000Z.sqlite3", "index-20250103T000000Z.sqlite3"]


def test_snapshot_hard_links_unchanged_files(tmp_path, restored):
    config = backup.load_config(_config(tmp_path, restored["config"].storage_directory))
    first = backup.backup_storage(config, "20250101T000000Z")
    second = backup.backup_storage(config, "20250108T000000Z")
    relative = backup.storage_files(config)[0]
    assert (first / relative).stat().st_ino == (second / relative).stat().st_ino


def test_restore_reports_files_newer_than_snapshot(tmp_path):
    inventory = localservers.write_local_inventory(tmp_path, [])
    orthanc = localservers.OrthancProcess(load_site(inventory), tmp_path)
    storage = tmp_path / "orthanc-storage"
    config_path = _config(tmp_path, storage)
    config = backup.load_config(config_path)
    orthanc.start()
    try:
        _upload(orthanc, make_instance())
        backup.backup_storage(config)
        late = _upload(orthanc, make_instance())
    finally:
        orthanc.stop()
    backup.backup_index(config)
    shutil.rmtree(storage)

    result = subprocess.run([sys.executable, "-m", "dicomfleet", "restore", "--config", str(config_path)],
                            capture_output=True, text=True)

    assert result.returncode == 1
    assert "1 attachments are missing" in result.stderr
    assert f"of instance {late} is missing" in result.stderr
