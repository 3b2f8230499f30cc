"""Heartbeats into the real dashboard process: accepted ones are stored, bad ones rejected, logged and not stored."""

from __future__ import annotations

import dataclasses
import datetime
import json
import threading
import time

import pytest
import requests

from dicomfleet.agent import heartbeat as agent_heartbeat
from dicomfleet.dashboard import config as dashboard_config
from dicomfleet.dashboard import heartbeats
from dicomfleet.localservers import free_port
from agent_support import TlsTunnel, make_test_ca
from test_dashboard_support import DashboardSite, heartbeat_body, wait_until


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    running = DashboardSite(tmp_path_factory.mktemp("heartbeats")).start()
    yield running
    running.stop()


def _stored(site: DashboardSite, machine_id: str) -> dict | None:
    return site.database["machine_heartbeats"].find_one({"_id": machine_id})


def _stored_soon(site: DashboardSite, machine_id: str) -> dict:
    """Wait for the dashboard's writer, which stores heartbeats about once a second."""
    return wait_until(lambda: _stored(site, machine_id), 10, f"the heartbeat of {machine_id} in MongoDB")


def test_heartbeat_accepted_and_stored(site):
    body = heartbeat_body("ct1", files_queued=7, files_sent_today=42, files_failed=1, files_quarantined=2)
    answer = site.post_heartbeat("ct1", body)
    assert answer.status_code == 200
    stored = _stored_soon(site, "ct1")
    assert stored["files_queued"] == 7
    assert stored["files_sent_today"] == 42
    assert stored["remote_address"] == "127.0.0.1"


def test_heartbeat_counts_in_fleet_view(site):
    site.post_heartbeat("mr1", heartbeat_body("mr1", files_queued=3, files_failed=2))
    row = site.machine_row("mr1")
    assert row["files_queued"] == 3
    assert row["files_failed"] == 2
    assert row["state"] in ("warning", "silent")
    assert "2 files failed and wait for a retry" in row["reasons"]


def test_heartbeat_wrong_token_rejected(site):
    site.database["machine_heartbeats"].delete_many({"_id": "xr1"})
    answer = site.post_heartbeat("xr1", token="not-the-token-of-xr1")
    time.sleep(1.5)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert _stored(site, "xr1") is None


def test_heartbeat_other_machines_token_rejected(site):
    answer = site.post_heartbeat("xr1", token=site.token("ct1"))
    assert answer.status_code == 401
    assert _stored(site, "xr1") is None


def test_heartbeat_rejection_logged_without_token(site):
    secret = "secret-token-that-must-not-be-logged"
    site.post_heartbeat("xr1", token=secret)
    log = wait_until(lambda: "Rejected a heartbeat for machine xr1" in site.dashboard.log_text()
                     and site.dashboard.log_text(), 5, "the rejection in the log")
    assert "from 127.0.0.1 with HTTP 401" in log
    assert secret not in log
    assert site.token("xr1") not in log


def test_heartbeat_unknown_machine_rejected(site):
    answer = site.post_heartbeat("ct9", token=site.token("ct1"))
    assert answer.status_code == 404
    assert "no machine with this id" in answer.json()["error"]
    assert _stored(site, "ct9") is None


@pytest.mark.parametrize("data, message", [
    (b"{not json", "not UTF-8 JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"state": "sending", "agent_version": "0.1.0", "files_queued": -1, "files_sent_today": 0, '
     b'"files_failed": 0, "files_quarantined": 0}', "files_queued must be a whole number"),
    (b'{"state": "dancing", "agent_version": "0.1.0"}', "state must be one of"),
    (b'{"machine": "mr1", "state": "sending", "agent_version": "0.1.0"}', "the body names machine 'mr1'"),
    (b'{"state": "sending", "agent_version": "0.1.0", "files_queued": 0, "files_sent_today": 0, '
     b'"files_failed": 0, "files_quarantined": 0, "last_success_at": "yesterday"}', "last_success_at must be"),
])
def test_heartbeat_malformed_rejected(site, data, message):
    site.database["machine_heartbeats"].delete_many({"_id": "xr1"})
    answer = site.post_heartbeat("xr1", data=data, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    assert message in answer.json()["error"]
    assert _stored(site, "xr1") is None


def test_heartbeat_oversized_rejected(site):
    site.database["machine_heartbeats"].delete_many({"_id": "xr1"})
    body = heartbeat_body("xr1", last_error="x" * 20000)
    answer = site.post_heartbeat("xr1", body)
    assert answer.status_code == 413
    assert _stored(site, "xr1") is None


def test_heartbeat_wrong_content_type_rejected(site):
    answer = site.post_heartbeat("xr1", data=b"files_queued=1", headers={"Content-Type": "text/plain"})
    assert answer.status_code == 415


def test_heartbeat_get_not_allowed(site):
    answer = requests.get(f"{site.url}/api/v1/heartbeats/ct1", timeout=10)
    assert answer.status_code == 405


def test_heartbeat_rejections_counted_in_metrics(site):
    site.post_heartbeat("xr1", token="wrong")
    metrics = requests.get(site.url + "/metrics", auth=site.login, timeout=10).text
    line = [item for item in metrics.splitlines()
            if item.startswith('dicomfleet_dashboard_heartbeats_rejected_total{reason="401"}')]
    assert len(line) == 1
    assert float(line[0].split()[-1]) >= 1


def test_heartbeat_survives_dashboard_restart(site):
    site.post_heartbeat("ct1", heartbeat_body("ct1", files_sent_today=99))
    site.dashboard.stop()
    site.start_dashboard()
    row = site.machine_row("ct1")
    assert row["files_sent_today"] == 99
    assert row["last_heartbeat_at"] is not None


def test_agent_sender_posts_accepted_heartbeat(site):
    stop = threading.Event()
    settings = agent_heartbeat.HeartbeatSettings(url=site.url + "/api/v1/heartbeats",
                                                 token_folder=site.folder / "tokens")
    (site.folder / "tokens").mkdir(exist_ok=True)
    (site.folder / "tokens" / "heartbeat-xr1").write_text(site.token("xr1") + "\n")
    document = {"agent_version": "0.1.0", "host": "xr1", "machines": {"xr1": {
        "transport": "rest", "state": "sending", "files_queued": 5, "files_sent_today": 8, "files_failed": 0,
        "files_quarantined": 0, "last_success_at": None, "last_error": None, "last_error_at": None,
        "oldest_queued_age_s": 12.5,
        "watch_folders": {"/srv/xr1": {"exists": True, "free_bytes": 10**11, "total_bytes": 10**12}}}}}
    sender = agent_heartbeat.HeartbeatSender(settings, ["xr1"], lambda: document, stop)
    assert sender.send_once() is True
    row = site.machine_row("xr1")
    assert row["files_queued"] == 5
    assert row["oldest_queued_age_s"] == 12.5


def _sender_document(machine_id: str, files_queued: int) -> dict:
    return {"agent_version": "0.1.0", "host": machine_id, "machines": {machine_id: {
        "transport": "rest", "state": "sending", "files_queued": files_queued, "watch_folders": {}}}}


@pytest.fixture(scope="module")
def https_front(site, tmp_path_factory):
    """The dashboard behind a TLS front whose certificate a test CA signed, as nginx serves it when deployed."""
    ca_file, bundle = make_test_ca(tmp_path_factory.mktemp("dashboard-ca"))
    tunnel = TlsTunnel(bundle, site.port)
    tokens = site.folder / "tokens"
    tokens.mkdir(exist_ok=True)
    (tokens / "heartbeat-mr1").write_text(site.token("mr1") + "\n")
    yield tunnel, ca_file
    tunnel.close()


def test_agent_sender_posts_over_https_with_ca_file(site, https_front):
    tunnel, ca_file = https_front
    settings = agent_heartbeat.HeartbeatSettings(url=tunnel.url + "/api/v1/heartbeats",
                                                 token_folder=site.folder / "tokens", ca_file=ca_file)
    sender = agent_heartbeat.HeartbeatSender(settings, ["mr1"], lambda: _sender_document("mr1", 7),
                                             threading.Event())
    assert sender.send_once() is True
    assert site.machine_row("mr1")["files_queued"] == 7


def test_agent_sender_refuses_dashboard_certificate_without_ca_file(site, https_front):
    tunnel, _ = https_front
    settings = agent_heartbeat.HeartbeatSettings(url=tunnel.url + "/api/v1/heartbeats", timeout_s=5,
                                                 token_folder=site.folder / "tokens")
    sender = agent_heartbeat.HeartbeatSender(settings, ["mr1"], lambda: _sender_document("mr1", 8),
                                             threading.Event())
    assert sender.send_once() is False
    assert sender.failed == 1


def test_heartbeat_table_takes_ca_file():
    settings = agent_heartbeat.parse_heartbeat_table(
        {"url": "https://127.0.0.1:8443/api/v1/heartbeats", "ca_file": "/etc/dicomfleet/tls/site-ca.pem"},
        "agent.toml")
    assert str(settings.ca_file) == "/etc/dicomfleet/tls/site-ca.pem"


def test_heartbeat_table_rejects_relative_ca_file():
    with pytest.raises(agent_heartbeat.HeartbeatConfigError) as caught:
        agent_heartbeat.parse_heartbeat_table(
            {"url": "https://127.0.0.1:8443/api/v1/heartbeats", "ca_file": "site-ca.pem"}, "agent.toml")
    assert "[heartbeat] ca_file = 'site-ca.pem' must be the absolute path of a PEM certificate" in str(caught.value)


def test_agent_sender_fails_fast_when_dashboard_down(site):
    stop = threading.Event()
    settings = agent_heartbeat.HeartbeatSettings(url=f"http://127.0.0.1:{free_port()}/api/v1/heartbeats",
                                                 timeout_s=2, token_folder=site.folder / "tokens")
    document = {"agent_version": "0.1.0", "host": "xr1", "machines": {"xr1": {
        "transport": "rest", "state": "sending", "watch_folders": {}}}}
    sender = agent_heartbeat.HeartbeatSender(settings, ["xr1"], lambda: document, stop)
    started = time.monotonic()
    assert sender.send_once() is False
    assert time.monotonic() - started < 3
    assert sender.failed == 1


def test_agent_sender_without_token_sends_nothing(site, tmp_path):
    stop = threading.Event()
    settings = agent_heartbeat.HeartbeatSettings(url=site.url + "/api/v1/heartbeats", token_folder=tmp_path)
    document = {"agent_version": "0.1.0", "host": "ct1", "machines": {"ct1": {"state": "sending",
                                                                             "watch_folders": {}}}}
    sender = agent_heartbeat.HeartbeatSender(settings, ["ct1"], lambda: document, stop)
    assert sender.send_once() is False
    assert sender.sent == 0


def test_pages_require_login(site):
    answer = requests.get(site.url + "/fleet", timeout=10, allow_redirects=False)
    assert answer.status_code == 302
    assert "/login?next=/fleet" in answer.headers["Location"]


def test_api_requires_login(site):
    answer = requests.get(site.url + "/api/v1/fleet", timeout=10)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Basic")


def test_metrics_require_login(site):
    answer = requests.get(site.url + "/metrics", timeout=10)
    assert answer.status_code == 401


def test_login_wrong_password_rejected(site):
    session = requests.Session()
    page = session.get(site.url + "/login", timeout=10).text
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    answer = session.post(site.url + "/login", data={"csrf": csrf, "user": "dicomfleet", "password": "wrong"},
                          timeout=10)
    assert answer.status_code == 401
    assert "Wrong user name or password." in answer.text


def test_login_sets_signed_httponly_cookie(site):
    session = site.browser_session()
    cookie = [item for item in session.cookies if item.name == "dicomfleet_session"][0]
    assert cookie.has_nonstandard_attr("HttpOnly")
    assert cookie.secure is False
    assert session.get(site.url + "/fleet", timeout=10).status_code == 200


def test_forwarded_proto_makes_cookie_secure(site):
    session = requests.Session()
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example"}
    page = session.get(site.url + "/login", headers=headers, timeout=10)
    assert "Secure" in page.headers["Set-Cookie"]


def test_forwarded_proto_redirects_to_https(site):
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example"}
    answer = requests.get(site.url + "/fleet", headers=headers, timeout=10, allow_redirects=False)
    assert answer.headers["Location"].startswith("https://pacs.example/login")


def test_forwarded_port_kept_in_redirect(site):
    # nginx in front of the dashboard listens on its own port (8443 by default), so a
    # redirect that dropped it would land on Orthanc's HTTPS front instead.
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example", "X-Forwarded-Port": "8443"}
    answer = requests.get(site.url + "/fleet", headers=headers, timeout=10, allow_redirects=False)
    assert answer.headers["Location"].startswith("https://pacs.example:8443/login")


def test_login_next_refuses_other_sites(site):
    session = requests.Session()
    page = session.get(site.url + "/login", timeout=10).text
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    user, password = site.login
    answer = session.post(site.url + "/login", data={"csrf": csrf, "user": user, "password": password,
                                                      "next": "//evil.example/"},
                          timeout=10, allow_redirects=False)
    assert answer.headers["Location"].endswith("/fleet")


def test_metrics_export_agent_and_orthanc(site):
    site.post_heartbeat("ct1", heartbeat_body("ct1", files_queued=4))
    text = requests.get(site.url + "/metrics", auth=site.login, timeout=10).text
    assert 'dicomfleet_agent_files_queued{machine="ct1"} 4.0' in text
    assert 'dicomfleet_agent_up{machine="ct1"} 1.0' in text
    assert "dicomfleet_orthanc_up 1.0" in text
    assert "dicomfleet_sync_lag_changes" in text


def test_first_heartbeat_reports_quarantined_today(site):
    # On a machine's first heartbeat of the day the baseline equals files_quarantined, so
    # only the agent's own count shows a file quarantined before that heartbeat.
    body = heartbeat_body("mr1", files_quarantined=1, files_quarantined_today=1)
    machine = dashboard_config.load_config(site.dashboard.config).machine("mr1")
    parsed = heartbeats.parse_heartbeat(machine, json.dumps(body).encode(), "127.0.0.1",
                                        datetime.datetime.now(datetime.timezone.utc))
    first = dataclasses.replace(parsed, quarantined_at_day_start=1)
    assert first.quarantined_today == 1
