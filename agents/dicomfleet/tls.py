"""The site's certificate authority and the TLS certificates of the hosts that run nginx.

The first deploy creates the CA on the control machine beside the site's secrets
(``inventory/.secrets/SITE/tls/``) and issues each HTTPS host a certificate for its
address; later deploys reuse both and reissue a certificate only when its names
change or it nears expiry. A site that brings certificates from the hospital's own
CA names them in the inventory instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dicomfleet import credentials
from dicomfleet.inventory import Site

log = logging.getLogger(__name__)

# Where hosts keep the TLS files the deploy puts there.
TLS_DIR = "/etc/dicomfleet/tls"
CA_FILE = f"{TLS_DIR}/site-ca.pem"

CA_DAYS = 3650
CERTIFICATE_DAYS = 730
# A certificate with less time left than this is reissued by the next deploy.
RENEW_BEFORE = datetime.timedelta(days=30)


class TLSError(Exception):
    """Raised when a certificate named by the inventory cannot be used."""


@dataclasses.dataclass(frozen=True)
class HostCertificate:
    """A host's certificate chain and private key, as PEM text."""

    certificate: str
    key: str
    ca: str


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Write DATA to PATH with mode 0600, replacing the file atomically."""
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    temporary.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def subject_names(addresses: list[str], dns_names: list[str]) -> list[x509.GeneralName]:
    """Return the subject alternative names for ADDRESSES (IP literals or host names) and DNS_NAMES."""
    names: list[x509.GeneralName] = []
    for value in [*addresses, *dns_names]:
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            name = x509.DNSName(value)
        if name not in names:
            names.append(name)
    return names


class SiteCA:
    """The site's own certificate authority, kept in FOLDER on the control machine.

    With CREATE false nothing is generated, and missing material reads as the
    secrets' placeholder, as ``dicomfleet render`` needs.
    """

    def __init__(self, folder: Path, create: bool, site_name: str):
        self.folder = folder
        self.create = create
        self.site_name = site_name

    @property
    def certificate_path(self) -> Path:
        """The CA certificate on the control machine."""
        return self.folder / "site-ca.pem"

    @property
    def key_path(self) -> Path:
        """The CA's private key on the control machine."""
        return self.folder / "site-ca.key"

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
        try:
            certificate = x509.load_pem_x509_certificate(self.certificate_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except FileNotFoundError:
            return None
        return certificate, key

    def _generate(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dicomfleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"dicomfleet site CA {self.site_name}"),
        ])
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.key_path, _key_pem(key))
        _write_private(self.certificate_path, certificate.public_bytes(serialization.Encoding.PEM))
        log.info("Created the site CA of %s in %s", self.site_name, self.folder)
        return certificate, key

    def _authority(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
        loaded = self._load()
        if loaded is None and self.create:
            loaded = self._generate()
        return loaded

    def certificate_pem(self) -> str:
        """Return the CA certificate as PEM text, or the placeholder when it does not exist yet."""
        authority = self._authority()
        if authority is None:
            return credentials.PLACEHOLDER + "\n"
        return authority[0].public_bytes(serialization.Encoding.PEM).decode("ascii")

    def host_certificate(self, host: str, addresses: list[str], dns_names: list[str]) -> HostCertificate:
        """Return HOST's certificate for ADDRESSES and DNS_NAMES, issuing it when needed.

        A stored certificate is reused while it carries exactly these names, was
        signed by the current CA and has more than 30 days left.
        """
        authority = self._authority()
        if authority is None:
            placeholder = credentials.PLACEHOLDER + "\n"
            return HostCertificate(certificate=placeholder, key=placeholder, ca=placeholder)
        ca_certificate, ca_key = authority
        ca_pem = ca_certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

        wanted = subject_names(addresses, dns_names)
        certificate_path = self.folder / f"{host}.pem"
        key_path = self.folder / f"{host}.key"
        stored = self._stored_certificate(certificate_path, key_path, ca_certificate, wanted)
        if stored is not None:
            return HostCertificate(certificate=stored[0], key=stored[1], ca=ca_pem)

        if not self.create:
            placeholder = credentials.PLACEHOLDER + "\n"
            return HostCertificate(certificate=placeholder, key=placeholder, ca=ca_pem)

        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dicomfleet"),
                x509.NameAttribute(NameOID.COMMON_NAME, host),
            ]))
            .issuer_name(ca_certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
        key_pem = _key_pem(key)
        _write_private(key_path, key_pem)
        _write_private(certificate_path, certificate_pem)
        log.info("Issued the TLS certificate of host %s for %s", host,
                 ", ".join(str(name.value) for name in wanted))
        return HostCertificate(certificate=certificate_pem.decode("ascii"), key=key_pem.decode("ascii"),
                               ca=ca_pem)

    @staticmethod
    def _stored_certificate(certificate_path: Path, key_path: Path, ca_certificate: x509.Certificate,
                            wanted: list[x509.GeneralName]) -> tuple[str, str] | None:
        try:
            certificate_pem = certificate_path.read_text(encoding="ascii")
            key_pem = key_path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None

        certificate = x509.load_pem_x509_certificate(certificate_pem.encode("ascii"))
        if certificate.issuer != ca_certificate.subject:
            return None
        try:
            certificate.verify_directly_issued_by(ca_certificate)
        except (ValueError, TypeError, InvalidSignature):
            return None
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if sorted(map(str, names)) != sorted(map(str, wanted)):
            return None
        if certificate.not_valid_after_utc - _now() < RENEW_BEFORE:
            return None
        return certificate_pem, key_pem


def site_ca(site: Site, secrets: credentials.SiteSecrets) -> SiteCA:
    """Return the CA of SITE, kept in the ``tls`` folder of its secrets."""
    return SiteCA(secrets.folder / "tls", secrets.create, site.name)


def _inventory_path(site: Site, value: Any) -> Path:
    path = Path(str(value))
    if not path.is_absolute():
        path = site.path.resolve().parent / path
    return path


def _inventory_file(site: Site, host: str, variable: str, value: Any) -> str:
    path = _inventory_path(site, value)
    try:
        return path.read_text(encoding="ascii")
    except OSError as error:
        raise TLSError(f"{site.path}: host {host}: {variable}: cannot read {path}: {error.strerror}; "
                       "give the path of a PEM file on the control machine, absolute or relative "
                       "to the inventory.") from error


def host_certificate(site: Site, host: str, secrets: credentials.SiteSecrets,
                     extra_dns_names: list[str] | None = None) -> HostCertificate:
    """Return the certificate nginx serves on HOST: the inventory's own, or one from the site CA.

    The site CA's certificate carries the host's address, its
    ``dicomfleet_tls_names`` and EXTRA_DNS_NAMES.
    """
    data = site.hosts[host].vars
    if "dicomfleet_tls_certificate" in data:
        return HostCertificate(
            certificate=_inventory_file(site, host, "dicomfleet_tls_certificate",
                                        data["dicomfleet_tls_certificate"]),
            key=_inventory_file(site, host, "dicomfleet_tls_key", data["dicomfleet_tls_key"]),
            ca=_inventory_file(site, host, "dicomfleet_tls_ca_certificate",
                               data["dicomfleet_tls_ca_certificate"]),
        )

    address = str(data.get("ansible_host", host))
    dns_names = [str(name) for name in data.get("dicomfleet_tls_names") or []]
    dns_names += extra_dns_names or []
    return site_ca(site, secrets).host_certificate(host, [address], dns_names)


def _hospital_ca(site: Site) -> tuple[str, Any] | None:
    """Return the central host and value of the inventory's ``dicomfleet_tls_ca_certificate``, if one names it."""
    for server in site.servers.values():
        value = server.vars.get("dicomfleet_tls_ca_certificate")
        if value:
            return server.host, value
    return None


def ca_certificate(site: Site, secrets: credentials.SiteSecrets) -> str:
    """Return the PEM text clients of SITE trust: the hospital's CA when the inventory names one."""
    hospital = _hospital_ca(site)
    if hospital is not None:
        return _inventory_file(site, hospital[0], "dicomfleet_tls_ca_certificate", hospital[1])
    return site_ca(site, secrets).certificate_pem()


def ca_certificate_file(site: Site, secrets: credentials.SiteSecrets) -> Path:
    """Return the file on the control machine holding the certificate of ``ca_certificate``, for HTTPS from there."""
    hospital = _hospital_ca(site)
    if hospital is not None:
        return _inventory_path(site, hospital[1])
    return site_ca(site, secrets).certificate_path
