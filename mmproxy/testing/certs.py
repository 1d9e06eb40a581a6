"""Test certificates made with cryptography: a private CA, server certificates it signs (with IP
address names, so a client that checks names can check them), client certificates, PKCS#12.

    ca = TestCA(directory, "mmproxy test CA")
    cert, key = ca.issue("store", ips=("127.0.0.2", "127.0.0.3"))           # PEM files
    cert, key = ca.issue("alice", client=True, email="alice@example.com")
    ca.path                                                                  # the CA certificate (PEM)
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Iterable, List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAYS = 365


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: str, key: rsa.RSAPrivateKey, password: Optional[bytes] = None) -> None:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))


def _write_cert(path: str, cert: x509.Certificate) -> None:
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def _validity(builder: x509.CertificateBuilder, days: float, not_before_days: float = 1) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(days=not_before_days)).not_valid_after(
        now + datetime.timedelta(days=days))


class TestCA:
    """A self-signed CA in ``directory`` (``ca.pem``) that issues certificates there."""

    __test__ = False        # not a pytest test class

    def __init__(self, directory: str, name: str = "mmproxy test CA") -> None:
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.key = _key()
        self.name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mmproxy tests"),
                               x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                   .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=True, crl_sign=True, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False))
        self.cert = _validity(builder, 3650).sign(self.key, hashes.SHA256())
        self.path = os.path.join(directory, "ca.pem")
        _write_cert(self.path, self.cert)

    def issue(self, name: str, *, ips: Iterable[str] = (), dns: Iterable[str] = (), client: bool = False,
              email: Optional[str] = None, days: float = DAYS, not_before_days: float = 1,
              password: Optional[bytes] = None, subject: Optional[x509.Name] = None) -> Tuple[str, str]:
        """(certificate PEM path, key PEM path) named ``<name>.pem`` / ``<name>.key`` in the CA's
        directory; a server certificate unless ``client``; ``password`` encrypts the key."""
        key = _key()
        if subject is None:
            attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mmproxy tests"),
                     x509.NameAttribute(NameOID.COMMON_NAME, name)]
            if email:
                attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
            subject = x509.Name(attrs)
        sans: List[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if email:
            sans.append(x509.RFC822Name(email))
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client
                                                         else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = _validity(builder, days, not_before_days).sign(self.key, hashes.SHA256())
        cert_path, key_path = os.path.join(self.dir, name + ".pem"), os.path.join(self.dir, name + ".key")
        _write_cert(cert_path, cert)
        _write_key(key_path, key, password)
        return cert_path, key_path


def to_pkcs12(cert_path: str, key_path: str, out: str, password: Optional[bytes] = None) -> str:
    """The certificate and key as one PKCS#12 file (what `pk12util -o` exports from an NSS database)."""
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    with open(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(pkcs12.serialize_key_and_certificates(b"Server-Cert", key, cert, None, enc))  # type: ignore[arg-type]
    return out


def self_signed(directory: str, name: str = "localhost", days: float = DAYS) -> Tuple[str, str]:
    """A self-signed RSA-2048 server certificate for ``name`` and 127.0.0.1 (cert.pem, key.pem)."""
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False))
    cert = _validity(builder, days).sign(key, hashes.SHA256())
    os.makedirs(directory, exist_ok=True)
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return cert_path, key_path
