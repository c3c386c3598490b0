"""The job manifest: what a volunteer runs, pinned by SHA-256 and signed by the job owner.

A manifest names the job, its rendezvous, the command (`entrypoint`: a Python file of the
job and its arguments), every file of the job with its SHA-256, and the Python
distributions it needs with a digest of their installed files. The owner signs the
manifest's exact bytes with Ed25519; the client pins the owner's public key the first
time it joins the job (trust on first use, as BOINC pins a project's code-signing key)
and refuses, with a clear message, a manifest signed by another key, a manifest or
signature that was altered, a file whose hash differs and a dependency that differs.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

logger = logging.getLogger(__name__)

FORMAT = 1
ENVELOPE_NAME = "manifest.signed.json"
MAX_FILES = 256
MAX_ENVELOPE_BYTES = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_JOB = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DIST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class ManifestError(ValueError):
    """A manifest that must not run: the message says what is wrong and what to do."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dependency_digest(name: str) -> tuple[str, str]:
    """(version, SHA-256) of an installed distribution: a digest of the per-file hashes its
    installer recorded (RECORD), without metadata and bytecode caches, which differ per
    machine. The same wheel installed anywhere gives the same digest."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise ManifestError(f"the job needs the Python package {name!r}, which is not "
                            f"installed here; install it (pip install {name}) and join "
                            "again") from None
    record = dist.read_text("RECORD") or ""
    lines = []
    for line in record.splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) != 3 or not parts[1]:
            continue
        path = parts[0]
        if ".dist-info/" in path or "__pycache__" in path or path.endswith(".pyc"):
            continue
        lines.append(f"{path},{parts[1]}")
    if not lines:
        raise ManifestError(f"the installed package {name!r} has no file hashes (installed "
                            "in editable mode?); it cannot be pinned")
    return dist.version, hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def _safe_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ManifestError(f"file name {name!r} in the manifest is not a relative path")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or name.startswith("."):
        raise ManifestError(f"file name {name!r} in the manifest leaves the job folder")
    return str(path)


@dataclass(frozen=True)
class Manifest:
    """What the job owner asks volunteers to run (the signed part)."""

    job: str
    rendezvous: str
    entrypoint: tuple[str, ...]
    files: dict[str, str]
    requirements: dict[str, dict[str, str]] = field(default_factory=dict)
    description: str = ""
    owner: str = ""
    created: float = 0.0
    #: SHA-256 of the CA that signed an https rendezvous's certificate (`AB:CD:...`): the
    #: CA the coordinator sends is used only if it matches ("" : none pinned)
    etcd_ca_sha256: str = ""

    def to_bytes(self) -> bytes:
        body = {"format": FORMAT, "job": self.job, "rendezvous": self.rendezvous,
                "entrypoint": list(self.entrypoint), "files": self.files,
                "requirements": self.requirements, "description": self.description,
                "owner": self.owner, "created": self.created}
        if self.etcd_ca_sha256:
            body["etcd_ca_sha256"] = self.etcd_ca_sha256
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse and validate (every field: it came over the network)."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"the manifest is not JSON: {exc}") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            found = body.get("format") if isinstance(body, dict) else body
            raise ManifestError(f"unknown manifest format {found!r}; update horde-volunteer")
        job, rdzv = body.get("job"), body.get("rendezvous")
        if not isinstance(job, str) or not _JOB.fullmatch(job):
            raise ManifestError(f"manifest job {job!r} is not a job name")
        if not isinstance(rdzv, str) or not re.fullmatch(r"(etcd|http|https)://[^\s/]{1,200}"
                                                          r"(,[^\s/]{1,200})*", rdzv):
            raise ManifestError(f"manifest rendezvous {rdzv!r} is not etcd://HOST:PORT "
                                "(or https://HOST:PORT)")
        files = body.get("files")
        if not isinstance(files, dict) or not 0 < len(files) <= MAX_FILES:
            raise ManifestError(f"manifest files must map 1-{MAX_FILES} names to SHA-256")
        for name, digest in files.items():
            _safe_name(name)
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise ManifestError(f"manifest file {name!r}: {digest!r} is not a SHA-256")
        entry = body.get("entrypoint")
        if (not isinstance(entry, list) or not entry or len(entry) > 100
                or not all(isinstance(a, str) and len(a) < 1000 for a in entry)):
            raise ManifestError("manifest entrypoint must be a list of strings")
        if entry[0] not in files or not entry[0].endswith(".py"):
            raise ManifestError(f"manifest entrypoint {entry[0]!r} must be one of the job's "
                                "pinned .py files")
        reqs = body.get("requirements", {})
        if not isinstance(reqs, dict) or len(reqs) > 100:
            raise ManifestError("manifest requirements must map names to versions and digests")
        for name, pin in reqs.items():
            if (not _DIST.fullmatch(name) or not isinstance(pin, dict)
                    or not isinstance(pin.get("version"), str)
                    or not _HEX64.fullmatch(str(pin.get("sha256")))):
                raise ManifestError(f"manifest requirement {name!r}: {pin!r} must be "
                                    "{'version': ..., 'sha256': ...}")
        for key in ("description", "owner"):
            if not isinstance(body.get(key, ""), str) or len(body.get(key, "")) > 2000:
                raise ManifestError(f"manifest {key} must be text")
        created = body.get("created", 0.0)
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            raise ManifestError("manifest created must be a number")
        pin = body.get("etcd_ca_sha256", "")
        if pin:
            from rendezvous.etcd_tls import parse_fingerprint

            try:
                pin = parse_fingerprint(pin) if isinstance(pin, str) else None
            except ValueError:
                pin = None
            if pin is None or not rdzv.startswith("https://"):
                raise ManifestError("manifest etcd_ca_sha256 must be a SHA-256 fingerprint, "
                                    "with an https:// rendezvous")
        return cls(job=job, rendezvous=rdzv, entrypoint=tuple(entry), files=dict(files),
                   requirements={k: dict(v) for k, v in reqs.items()},
                   description=body.get("description", ""), owner=body.get("owner", ""),
                   created=float(created), etcd_ca_sha256=pin)


# -- keys ---------------------------------------------------------------------------------

def fingerprint(public_raw: bytes) -> str:
    """A short, readable identity of an owner key (SHA-256 of the raw key, 16 bytes)."""
    digest = hashlib.sha256(public_raw).hexdigest()[:32]
    return ":".join(digest[i:i + 4] for i in range(0, 32, 4))


def generate_key(path: str | os.PathLike[str]) -> str:
    """Create an owner key (PEM, readable by the owner only); returns its fingerprint."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return fingerprint(_raw_public(key.public_key()))


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The owner's Ed25519 private key from its PEM file (ManifestError otherwise)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ManifestError(f"cannot read the owner key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ManifestError(f"{path} is not an Ed25519 key (make one with "
                            "horde-volunteer manifest keygen)")
    return key


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- signing and verifying ----------------------------------------------------------------

def build_manifest(job_dir: str | os.PathLike[str], job: str, rendezvous: str,
                   entrypoint: list[str], files: list[str] | None = None,
                   requirements: list[str] | None = None, description: str = "",
                   owner: str = "", etcd_ca_sha256: str = "") -> Manifest:
    """A manifest of `job_dir`'s files (default: every regular file but the envelope)."""
    root = Path(job_dir)
    names = files or sorted(str(p.relative_to(root).as_posix()) for p in root.rglob("*")
                            if p.is_file() and p.name != ENVELOPE_NAME
                            and "__pycache__" not in p.parts)
    pinned = {_safe_name(n): sha256_file(root / n) for n in names}
    reqs = {}
    for name in requirements or []:
        version, digest = dependency_digest(name)
        reqs[name] = {"version": version, "sha256": digest}
    manifest = Manifest(job=job, rendezvous=rendezvous, entrypoint=tuple(entrypoint),
                        files=pinned, requirements=reqs, description=description,
                        owner=owner, created=time.time(), etcd_ca_sha256=etcd_ca_sha256)
    return Manifest.from_bytes(manifest.to_bytes())  # the same checks the volunteers make


def sign(manifest: Manifest, key: Ed25519PrivateKey) -> dict[str, str]:
    """The signed envelope: the manifest's exact bytes, the signature, the public key."""
    raw = manifest.to_bytes()
    return {"manifest": base64.b64encode(raw).decode(),
            "signature": base64.b64encode(key.sign(raw)).decode(),
            "public_key": base64.b64encode(_raw_public(key.public_key())).decode()}


def _b64(envelope: dict[str, Any], name: str, size: int | None = None) -> bytes:
    value = envelope.get(name)
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or (size is not None and len(raw) != size):
        raise ManifestError(f"the signed manifest's {name!r} is missing or malformed; the "
                            "job owner must sign it again (horde-volunteer manifest sign)")
    return raw


def verify_envelope(envelope: object, pinned_key: bytes | None) -> tuple[Manifest, bytes]:
    """Check the signature (with the pinned key when there is one); return the manifest
    and the key that signed it. Raises ManifestError saying what is wrong."""
    if not isinstance(envelope, dict):
        raise ManifestError("the signed manifest is not a JSON object")
    raw = _b64(envelope, "manifest")
    signature = _b64(envelope, "signature", 64)
    public = _b64(envelope, "public_key", 32)
    if pinned_key is not None and public != pinned_key:
        raise ManifestError(
            f"the job owner's key changed: this job was first signed by key "
            f"{fingerprint(pinned_key)}, now by {fingerprint(public)}. Refusing to run it. If "
            "the owner really replaced the key (ask them), remove the pin with "
            "horde-volunteer forget and join again")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, raw)
    except InvalidSignature:
        raise ManifestError(
            f"the manifest's signature is not valid for key {fingerprint(public)}: the "
            "manifest or its signature was altered on the way. Refusing to run it") from None
    return Manifest.from_bytes(raw), public


def verify_files(manifest: Manifest, job_dir: str | os.PathLike[str]) -> None:
    """Every pinned file present with its SHA-256, and no unpinned `.py` file beside them."""
    root = Path(job_dir)
    for name, digest in manifest.files.items():
        path = root / name
        if not path.is_file():
            raise ManifestError(f"job file {name} is missing from {root}")
        actual = sha256_file(path)
        if actual != digest:
            raise ManifestError(
                f"job file {name} differs from the signed manifest (SHA-256 {actual[:16]}..., "
                f"signed {digest[:16]}...): it was changed after the owner signed the job. "
                "Refusing to run it")
    for path in root.rglob("*.py"):
        name = path.relative_to(root).as_posix()
        if name not in manifest.files:
            raise ManifestError(f"{name} in {root} is not in the signed manifest; refusing "
                                "to run a job folder with unpinned code")


def verify_requirements(manifest: Manifest) -> None:
    """Every pinned dependency installed here in exactly the signed version and content."""
    for name, pin in manifest.requirements.items():
        version, digest = dependency_digest(name)
        if version != pin["version"] or digest != pin["sha256"]:
            raise ManifestError(
                f"the installed {name} {version} differs from the one the job owner pinned "
                f"({pin['version']}, files digest {pin['sha256'][:16]}...; here "
                f"{digest[:16]}...). Install {name}=={pin['version']} from its official "
                "wheel and join again")


class PinStore:
    """Owner keys pinned per job address, in the client's data folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def _path(self, job_url: str) -> Path:
        return self.folder / (hashlib.sha256(job_url.encode()).hexdigest()[:24] + ".pub")

    def get(self, job_url: str) -> bytes | None:
        path = self._path(job_url)
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return base64.b64decode(data["public_key"])

    def pin(self, job_url: str, public: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._path(job_url).write_text(json.dumps({
            "job_url": job_url, "public_key": base64.b64encode(public).decode(),
            "fingerprint": fingerprint(public), "pinned_at": time.time()}))
        logger.info("pinned the owner key %s for %s", fingerprint(public), job_url)

    def forget(self, job_url: str) -> bool:
        path = self._path(job_url)
        if path.exists():
            path.unlink()
            return True
        return False
