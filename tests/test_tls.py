"""The site CA and the certificates it issues: created once, reused, reissued when names change."""

from __future__ import annotations

import datetime
import ssl
import subprocess

import pytest
from cryptography import x509

from dicomfleet import credentials, render, tls
from dicomfleet.inventory import load_site
from test_archive_support import EXAMPLE, file_of


@pytest.fixture
def example_site():
    return load_site(EXAMPLE)


@pytest.fixture
def ca(tmp_path):
    return tls.SiteCA(tmp_path / "tls", create=True, site_name="example-hospital")


def _names(pem: str) -> list[str]:
    certificate = x509.load_pem_x509_certificate(pem.encode())
    extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return sorted(str(name.value) for name in extension.value)


def test_ca_files_private(ca):
    ca.certificate_pem()
    modes = {path.name: path.stat().st_mode & 0o777 for path in ca.folder.iterdir()}
    assert modes == {"site-ca.pem": 0o600, "site-ca.key": 0o600}


def test_ca_is_certificate_authority(ca):
    certificate = x509.load_pem_x509_certificate(ca.certificate_pem().encode())
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_host_certificate_names(ca):
    issued = ca.host_certificate("pacs1", ["192.0.2.10"], ["pacs1.example.org"])
    assert _names(issued.certificate) == ["192.0.2.10", "pacs1.example.org"]


def test_host_certificate_verifies_against_ca(ca, tmp_path):
    issued = ca.host_certificate("pacs1", ["192.0.2.10"], [])
    (tmp_path / "host.pem").write_text(issued.certificate)
    (tmp_path / "ca.pem").write_text(issued.ca)
    result = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "host.pem")],
                            capture_output=True, text=True)
    assert result.stdout.strip() == f"{tmp_path / 'host.pem'}: OK"


def test_host_certificate_key_matches(ca):
    issued = ca.host_certificate("pacs1", ["192.0.2.10"], [])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    path = ca.folder / "pacs1"
    # load_cert_chain raises ssl.SSLError when the key does not belong to the certificate.
    context.load_cert_chain(f"{path}.pem", f"{path}.key")
    assert issued.key == (ca.folder / "pacs1.key").read_text()


def test_host_certificate_reused(ca):
    first = ca.host_certificate("pacs1", ["192.0.2.10"], [])
    second = ca.host_certificate("pacs1", ["192.0.2.10"], [])
    assert (first.certificate, first.key) == (second.certificate, second.key)


def test_host_certificate_reissued_for_new_name(ca):
    first = ca.host_certificate("pacs1", ["192.0.2.10"], [])
    second = ca.host_certificate("pacs1", ["192.0.2.10"], ["pacs1.example.org"])
    assert first.certificate != second.certificate


def test_host_certificate_reissued_near_expiry(ca, monkeypatch):
    first = ca.host_certificate("pacs1", ["192.0.2.10"], [])
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=tls.CERTIFICATE_DAYS - 10)
    monkeypatch.setattr(tls, "_now", lambda: later)
    second = ca.host_certificate("pacs1", ["192.0.2.10"], [])
    assert first.certificate != second.certificate


def test_placeholder_without_create(tmp_path):
    ca = tls.SiteCA(tmp_path / "tls", create=False, site_name="example-hospital")
    issued = ca.host_certificate("pacs1", ["192.0.2.10"], [])
    assert (issued.certificate, issued.key, (tmp_path / "tls").exists()) == (
        credentials.PLACEHOLDER + "\n", credentials.PLACEHOLDER + "\n", False)


def test_inventory_certificate_used(tmp_path, ca):
    issued = ca.host_certificate("pacs1", ["192.0.2.10"], [])
    for name, content in (("hospital.pem", issued.certificate), ("hospital.key", issued.key),
                          ("hospital-ca.pem", issued.ca)):
        (tmp_path / name).write_text(content)
    inventory = tmp_path / "site.yml"
    text = EXAMPLE.read_text().replace(
        "          dicomfleet_orthanc_name: pacs1\n",
        "          dicomfleet_orthanc_name: pacs1\n"
        "          dicomfleet_tls_certificate: hospital.pem\n"
        "          dicomfleet_tls_key: hospital.key\n"
        "          dicomfleet_tls_ca_certificate: hospital-ca.pem\n")
    inventory.write_text(text)
    site = load_site(inventory)
    plan = render.plan_host(site, "pacs1", credentials.ensure_secrets(site, tmp_path / "secrets"))
    assert file_of(plan, f"{tls.TLS_DIR}/server.pem").content == issued.certificate


def test_inventory_certificate_needs_key(tmp_path):
    from dicomfleet.inventory import InventoryError

    inventory = tmp_path / "site.yml"
    inventory.write_text(EXAMPLE.read_text().replace(
        "          dicomfleet_orthanc_name: pacs1\n",
        "          dicomfleet_orthanc_name: pacs1\n          dicomfleet_tls_certificate: hospital.pem\n"))
    with pytest.raises(InventoryError) as caught:
        load_site(inventory)
    assert "host pacs1: dicomfleet_tls_key: missing" in caught.value.problems[0]


def test_server_key_readable_by_nginx_only(example_site, tmp_path):
    plan = render.plan_host(example_site, "pacs1", credentials.ensure_secrets(example_site, tmp_path))
    key = file_of(plan, f"{tls.TLS_DIR}/server.key")
    assert (key.mode, key.owner, key.group, key.secret) == ("0640", "root", "www-data", True)


def test_agent_hosts_get_site_ca(example_site, tmp_path):
    secrets = credentials.ensure_secrets(example_site, tmp_path)
    plan = render.plan_host(example_site, "ct-room1", secrets)
    assert file_of(plan, tls.CA_FILE).content == tls.site_ca(example_site, secrets).certificate_pem()
