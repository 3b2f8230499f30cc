"""Unit tests of the fleet benchmark's plan: machine names, inventory validity and the day's size."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

# bench/ is a top-level package of the checkout, not part of the installed dicomfleet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomfleet import credentials, localservers  # noqa: E402
from dicomfleet.inventory import load_site  # noqa: E402

from bench import fleet  # noqa: E402


def test_full_day_has_200_machines():
    assert fleet.FULL_DAY.machine_count == 200


def test_full_day_file_count():
    # 50 CT x 2 studies x 40 slices + 50 MR x 2 x 40 + 100 CR x 2 x 2.
    assert fleet.FULL_DAY.file_count == 8400


def test_machine_ids_unique():
    ids = [machine_id for machine_id, _ in fleet.machine_ids(fleet.FULL_DAY)]
    assert len(ids) == len(set(ids))
    assert ids[0] == "ct001"
    assert ids[-1] == "cr100"


def test_fleet_inventory_validates(tmp_path):
    machines = fleet.fleet_machines(fleet.FULL_DAY, tmp_path / "machines")
    site = load_site(localservers.write_local_inventory(tmp_path, machines))
    assert len(site.machines) == 200
    assert site.machines["mr050"].watch_folders == (str(tmp_path / "machines" / "mr050" / "export"),)


def test_stage_day_writes_every_file(tmp_path):
    day = fleet.DayProfile(machines={"CT": 1, "CR": 1}, studies={"CT": 2, "CR": 1}, series={"CT": 1, "CR": 1},
                           images={"CT": 3, "CR": 2}, window_s=5.0)
    studies = fleet.stage_day(day, tmp_path)
    files = [path for study in studies for path in study.files]
    assert len(studies) == 3
    assert len(files) == day.file_count
    assert all(path.exists() for path in files)
    assert [study.release_at for study in studies] == sorted(study.release_at for study in studies)


def test_release_moves_study_into_subfolder(tmp_path):
    day = fleet.DayProfile(machines={"CT": 1}, studies={"CT": 1}, series={"CT": 1}, images={"CT": 2},
                           window_s=1.0)
    (study,) = fleet.stage_day(day, tmp_path / "staging")
    watch = tmp_path / "export"
    watch.mkdir()
    fleet.release(study, watch)
    landed = sorted(path.name for path in (watch / study.study_uid).iterdir())
    assert landed == sorted(path.name for path in study.files)
    assert not any(path.exists() for path in study.files)


def test_files_lost_counts_missing_in_mongodb():
    result = fleet.FleetResult(
        machines=2, agent_processes=2, machines_per_process=1, agent_restarts=0, files_dropped=10, bytes_dropped=0, files_sent=10, files_stored=10,
        files_recorded=8, studies_expected=2, studies_recorded=2, studies_wrong_source=0,
        seconds_to_stored=1.0, seconds_to_recorded=None, start_seconds=1.0, per_machine_lost={"ct001": 2})
    assert result.files_lost == 2


def test_machines_per_process_one_when_room():
    assert fleet.machines_per_process(200, 900) == 1


def test_machines_per_process_groups_when_short():
    # 150 free instances minus a reserve of 100 leave room for 50 processes.
    assert fleet.machines_per_process(200, 150) == 4


def test_machines_per_process_no_room_one_process():
    assert fleet.machines_per_process(200, 20) == 200


def test_machines_per_process_unknown_limit():
    assert fleet.machines_per_process(200, None) == 1


def test_group_config_serves_each_machine(tmp_path):
    machines = fleet.fleet_machines(fleet.QUICK_DAY, tmp_path / "machines")
    site = load_site(localservers.write_local_inventory(tmp_path, machines))
    secrets = credentials.ensure_secrets(site, tmp_path / "secrets")
    path = fleet.write_group_config(site, ["ct001", "mr002"], tmp_path / "agent-001", secrets)
    config = tomllib.loads(path.read_text())
    assert [machine["id"] for machine in config["machine"]] == ["ct001", "mr002"]
    assert config["agent"]["spool"] == str(tmp_path / "agent-001" / "agent-state" / "spool.sqlite3")
    assert Path(config["machine"][1]["password_file"]).read_text().strip() == secrets.orthanc_password("mr002")
