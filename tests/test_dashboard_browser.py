"""The dashboard in Debian's Chromium, driven by Playwright, after real files went through agents and the sync.

Screenshots are kept under test-artifacts/ at the top of the checkout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from test_dashboard_support import MACHINES, DashboardSite, make_instance, wait_until

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

# Studies per machine, each a list of instance counts per study.
PLAN = {"ct1": [2, 1], "mr1": [3], "xr1": [1]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing: install the apt package chromium (the Makefile does).")
    site = DashboardSite(tmp_path_factory.mktemp("browser"), heartbeat_interval_s=1).start()
    try:
        site.start_sync()
        for machine_id in MACHINES:
            site.start_agent(machine_id)
        for machine_id in MACHINES:
            wait_until(lambda: site.machine_row(machine_id)["last_heartbeat_at"], 90,
                       f"the first heartbeat of {machine_id}")

        studies = {}
        for machine_id, counts in PLAN.items():
            template = MACHINES[machine_id]["template"]
            for number, instances in enumerate(counts, start=1):
                study_uid = generate_uid()
                series_uid = generate_uid()
                studies[study_uid] = machine_id
                for index in range(instances):
                    data = make_instance(template, study_uid, series_uid, PatientName=f"TEST^{machine_id.upper()}",
                                         StudyDescription=f"{machine_id} study {number}")
                    site.drop(machine_id, f"study{number}-image{index}.dcm", data)

        def all_recorded() -> bool:
            found = site.database["studies"].count_documents({"studyInstanceUID": {"$in": list(studies)}})
            return found == len(studies)

        wait_until(all_recorded, 90, "every study in MongoDB", interval=0.5)
        yield site
    finally:
        site.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _expected_counts(machine_id: str) -> tuple[str, str]:
    return str(len(PLAN[machine_id])), str(sum(PLAN[machine_id]))


def test_fleet_page_shows_three_machines_with_counts(fleet, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1500, "height": 800})
    page.goto(fleet.url + "/fleet")
    assert "/login" in page.url

    user, password = fleet.login
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url("**/fleet")

    def counts_shown() -> bool:
        page.reload()
        for machine_id in PLAN:
            row = page.locator(f"tr[data-machine={machine_id}]")
            shown = (row.locator("[data-field=studies-today]").inner_text(),
                     row.locator("[data-field=instances-today]").inner_text())
            if shown != _expected_counts(machine_id):
                return False
            if row.locator("[data-field=state]").inner_text() != "ok":
                return False
        # The Orthanc panel comes from a snapshot the dashboard refreshes every few seconds.
        return page.locator("[data-field=orthanc-instances]").inner_text() == str(sum(map(sum, PLAN.values())))

    wait_until(counts_shown, 30, "the expected counts and states on the fleet page", interval=1)
    page.screenshot(path=str(ARTIFACTS / "dashboard-fleet.png"), full_page=True)

    assert page.locator("tbody tr").count() == 3
    for machine_id in PLAN:
        row = page.locator(f"tr[data-machine={machine_id}]")
        assert row.locator("[data-field=studies-today]").inner_text() == _expected_counts(machine_id)[0]
        assert row.locator("[data-field=instances-today]").inner_text() == _expected_counts(machine_id)[1]
        assert row.locator("[data-field=state]").inner_text() == "ok"
    assert page.locator("[data-field=orthanc-instances]").inner_text() == str(sum(map(sum, PLAN.values())))
    page.close()


def test_machine_page_shows_thumbnails(fleet, browser):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.goto(fleet.url + "/login")
    user, password = fleet.login
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url("**/fleet")

    page.click("tr[data-machine=ct1] a")
    page.wait_for_url("**/machines/ct1")
    thumbnails = page.locator("img.thumbnail")
    thumbnails.first.wait_for()
    assert thumbnails.count() == 2
    for index in range(2):
        image = thumbnails.nth(index)
        image.scroll_into_view_if_needed()
        wait_until(lambda: image.evaluate("element => element.complete && element.naturalWidth > 0"), 15,
                   "the thumbnail to load")
        assert image.evaluate("element => element.naturalWidth") > 0

    source = thumbnails.first.get_attribute("src")
    answer = page.request.get(fleet.url + source)
    assert answer.headers["content-type"] == "image/png"
    assert answer.body()[:8] == b"\x89PNG\r\n\x1a\n"
    page.screenshot(path=str(ARTIFACTS / "dashboard-machine-ct1.png"), full_page=True)

    content = page.content()
    assert fleet.secrets.orthanc_password("dicomfleet-dashboard") not in content
    assert fleet.secrets.orthanc_password("dicomfleet-admin") not in content
    page.close()
