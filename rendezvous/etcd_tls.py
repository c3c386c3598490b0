"""TLS to etcd: the client's settings, and the certificates of the embedded etcd.

A rendezvous URL `https://host:port` (or `https://h1:p1,h2:p2,...` for a cluster) makes
every request go over TLS. The server's certificate is checked against the CA bundle in
HORDE_ETCD_CACERT (else the system's trusted CAs; verification is never turned off);
HORDE_ETCD_CERT and HORDE_ETCD_KEY give a client certificate, for an etcd started with
`--client-cert-auth`. These variables are read in one place, `EtcdTLS.from_env`, beside
the credentials (`EtcdCredentials.from_env`), by `rendezvous.backend_from_url`.

`horderun --etcd-tls` has the embedded etcd serve https with a CA made at start
(`make_embedded_certificates`): the launcher's processes and workers get its CA file in
HORDE_ETCD_CACERT; a machine that joins from elsewhere needs a copy of it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import ipaddress
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The settings' variables, by field name.
ENV = {"cacert": "HORDE_ETCD_CACERT", "cert": "HORDE_ETCD_CERT", "key": "HORDE_ETCD_KEY"}


def _readable(path: str, variable: str) -> str:
    """`path` if it names a readable file, else ValueError naming the file and variable."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
    except OSError as exc:
        raise ValueError(f"{variable}={path!r} cannot be read ({exc.strerror or exc}); point "
                         f"it at a PEM file (docs/security.md, 'TLS')") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{variable}={path!r} is not a PEM file (no '-----BEGIN' line); "
                         "give the certificate or key in PEM form")
    return path


@dataclass(frozen=True)
class EtcdTLS:
    """Client TLS settings for https:// rendezvous URLs (all optional; paths to PEM files).

    cacert: CA bundle that must have signed etcd's certificate (None: the system's CAs).
    cert / key: this client's certificate and key, for etcd's --client-cert-auth.
    """

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("HORDE_ETCD_CERT and HORDE_ETCD_KEY go together: give both (the "
                             "client certificate and its key) or neither")
        for name, variable in ENV.items():
            value = getattr(self, name)
            if value is not None:
                _readable(value, variable)

    @property
    def verify(self) -> str | bool:
        """What `requests` takes as `verify`: the CA bundle, else True (system CAs)."""
        return self.cacert if self.cacert is not None else True

    @property
    def client_cert(self) -> tuple[str, str] | None:
        """What `requests` takes as `cert`, or None without a client certificate."""
        return (self.cert, self.key) if self.cert is not None and self.key is not None else None

    @property
    def configured(self) -> bool:
        return any(getattr(self, name) is not None for name in ENV)

    def to_env(self) -> dict[str, str]:
        """The HORDE_ETCD_* variables that make `from_env` return these settings."""
        return {variable: str(getattr(self, name)) for name, variable in ENV.items()
                if getattr(self, name) is not None}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EtcdTLS:
        """Settings from HORDE_ETCD_CACERT, HORDE_ETCD_CERT and HORDE_ETCD_KEY (unset or
        empty: not given). ValueError, naming the file and variable, for an unreadable file."""
        environ = os.environ if environ is None else environ
        values = {name: (environ.get(variable) or None) for name, variable in ENV.items()}
        return cls(**values)


def fingerprint(path: str | Path) -> str:
    """SHA-256 of the (first) certificate in a PEM file, as `AB:CD:...` (what
    `openssl x509 -noout -fingerprint -sha256` prints)."""
    return pem_fingerprint(Path(path).read_bytes())


def pem_fingerprint(pem: bytes) -> str:
    """SHA-256 of the first certificate in `pem`, as `AB:CD:...`; ValueError if none."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(pem)
    digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def parse_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as given by a person (`AB:CD:...`, hex without colons, an
    optional `sha256:` prefix), as `AB:CD:...`; ValueError naming what is wrong."""
    digits = text.strip()
    if digits.lower().startswith("sha256:"):
        digits = digits[len("sha256:"):]
    digits = digits.replace(":", "").upper()
    if len(digits) != 64 or any(c not in "0123456789ABCDEF" for c in digits):
        raise ValueError(f"{text[:120]!r} is not a SHA-256 fingerprint: give the 64 hex "
                         "digits (colons allowed) of the owner's join command")
    return ":".join(digits[i:i + 2] for i in range(0, 64, 2))


def pinned_ca(pem: str | None, pin: str, pinned_by: str = "the join command") -> bytes:
    """The CA certificate `pem` (received from a coordinator; None: it sent none) if its
    SHA-256 is `pin`, which `pinned_by` gave; ValueError otherwise (a wrong CA is never
    written or used)."""
    if pem is None:
        raise ValueError(f"{pinned_by} pins etcd's CA, but the job's coordinator sent none: "
                         "give the CA file with HORDE_ETCD_CACERT (horderun --etcd-cacert)")
    data = pem.encode("ascii", errors="replace")
    try:
        got = pem_fingerprint(data)
    except ValueError as exc:
        raise ValueError(f"the coordinator's etcd CA is not a PEM certificate ({exc})") from None
    want = parse_fingerprint(pin)
    if got != want:
        raise ValueError(f"the coordinator sent an etcd CA with SHA-256 {got}, but {pinned_by} "
                         f"pins {want}: refusing it (someone between this machine and the "
                         "coordinator may have replaced it; ask the job's owner)")
    return data


def save_pinned_ca(pem: str | None, pin: str, folder: Path, job: str,
                   pinned_by: str = "the join command") -> Path:
    """`pinned_ca`, written to `folder/<job>-ca.pem` (the folder is made private)."""
    data = pinned_ca(pem, pin, pinned_by)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{job}-ca.pem"
    path.write_bytes(data)
    return path


def tls_with_ca(cacert: Path) -> EtcdTLS:
    """The HORDE_ETCD_* settings, with `cacert` (a pinned CA) as the CA bundle."""
    return dataclasses.replace(EtcdTLS.from_env(), cacert=str(cacert))


@dataclass(frozen=True)
class TLSFiles:
    """The PEM files of a CA and of one certificate it signed."""

    ca_cert: Path
    cert: Path
    key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, mode)


_PUBLIC = stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH  # 0644
_PRIVATE = stat.S_IRUSR | stat.S_IWUSR  # 0600


def make_ca(folder: Path, name: str = "Horde embedded etcd CA", days: int = 365
            ) -> tuple[Path, Path]:
    """A new self-signed CA (EC P-256) in `folder`: (ca.crt 0644, ca.key 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = folder / "ca.crt", folder / "ca.key"
    _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), _PRIVATE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), _PUBLIC)
    return cert_path, key_path


def issue_certificate(ca_cert: Path, ca_key: Path, folder: Path, stem: str,
                      hosts: Sequence[str] = (), client: bool = False, days: int = 365
                      ) -> TLSFiles:
    """A certificate signed by the CA, written as `<stem>.crt` (0644) and `<stem>.key`
    (0600) in `folder`: a server certificate for `hosts` (IP addresses become IP SANs,
    names DNS SANs), or with `client` a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    authority = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    authority_key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                           hosts[0] if hosts else stem)]))
               .issuer_name(authority.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.CLIENT_AUTH] if client
                   else [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                   critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   authority.public_key()), critical=False))  # type: ignore[arg-type]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(authority_key, hashes.SHA256())  # type: ignore[arg-type]
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), _PRIVATE)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), _PUBLIC)
    return TLSFiles(ca_cert, cert_path, key_path)


def make_embedded_certificates(folder: Path, host: str) -> TLSFiles:
    """A fresh CA and a server certificate for `host` (plus 127.0.0.1 and localhost),
    for the embedded etcd; the CA's key stays in `folder` (0600) for client certificates."""
    ca_cert, ca_key = make_ca(folder)
    return issue_certificate(ca_cert, ca_key, folder, "server",
                             hosts=[host, "127.0.0.1", "localhost"])
