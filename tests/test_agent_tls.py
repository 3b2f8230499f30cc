"""End-to-end tests of the agent sending over HTTPS, trusting Orthanc's certificate through ca_file.

Orthanc 1.10.1's own HTTPS crashed on this Debian build, and production puts nginx
in front of Orthanc, so a small TLS front from the tests forwards to Orthanc's HTTP port.
"""

from __future__ import annotations

import shutil

import pytest

from agent_support import MACHINE_ID, AgentSite, TlsTunnel, make_instance, make_test_ca, sop_instance_uid, wait_until

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test CA")


@pytest.fixture(scope="module")
def tls_site(tmp_path_factory):
    site = AgentSite(tmp_path_factory.mktemp("agent-tls"))
    site.orthanc.start()
    ca_file, bundle = make_test_ca(site.folder / "ca")
    tunnel = TlsTunnel(bundle, site.site.servers["central"].http_port)
    yield site, tunnel, ca_file
    tunnel.close()
    site.stop_all()


def _https_config(site: AgentSite, tunnel: TlsTunnel, ca_file) -> None:
    path = site.write_config()
    text = path.read_text(encoding="utf-8").replace(f'orthanc_url = "{site.orthanc.url}"',
                                                    f'orthanc_url = "{tunnel.url}"')
    assert tunnel.url in text
    if ca_file:
        text += f'ca_file = "{ca_file}"\n'
    path.write_text(text, encoding="utf-8")


def test_agent_sends_over_https_with_ca_file(tls_site):
    site, tunnel, ca_file = tls_site
    site.reset()
    _https_config(site, tunnel, ca_file)
    agent = site.start_agent()

    data = make_instance()
    (site.watch / "secure.dcm").write_bytes(data)
    stored = site.wait_stored([sop_instance_uid(data)])
    log = agent.wait_for_log("Stored file")

    assert site.source_machine(stored[sop_instance_uid(data)]) == MACHINE_ID
    assert tunnel.url in log


def test_agent_without_ca_file_keeps_files_queued(tls_site):
    site, tunnel, _ = tls_site
    site.reset()
    _https_config(site, tunnel, None)
    agent = site.start_agent()

    (site.watch / "untrusted.dcm").write_bytes(make_instance())
    log = agent.wait_for_log("is unreachable for machine")

    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert site.statistics()["CountInstances"] == 0
    wait_until(lambda: site.spool_rows() and site.spool_rows()[0]["state"] == "failed", timeout=10,
               message="the spool to record the failed attempt")
    assert "certificate verify failed" in site.spool_rows()[0]["last_error"]
    site.stop_agents()
