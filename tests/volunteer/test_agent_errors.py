"""The agent's failure paths against a real coordinator: each ends with a clear message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.coordinator.serverproc import ServerProcess
from tests.harness import REPO, unique_job
from tests.volunteer.conftest import JOB_SCRIPT, base_env, cli


def join(url: str, data, *flags: str) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    return subprocess.run(
        [sys.executable, "-m", "volunteer_client.cli", "join", url, "--data-dir", str(data),
         "--poll-seconds", "0.2", "--yes", *flags],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=base_env())


@pytest.fixture
def signed(tmp_path):
    folder = tmp_path / "jobdir"
    folder.mkdir()
    (folder / "train.py").write_bytes(JOB_SCRIPT.read_bytes())
    key = tmp_path / "owner.key"
    assert cli("manifest", "keygen", "--key", str(key)).returncode == 0
    job = unique_job("err")
    done = cli("manifest", "sign", "--key", str(key), "--dir", str(folder), "--job", job,
               "--rendezvous", "etcd://127.0.0.1:9", "--", "train.py")
    assert done.returncode == 0, done.stderr
    return folder, job


def test_unreachable_coordinator(tmp_path):
    done = join("http://127.0.0.1:9/job", tmp_path / "d")
    assert done.returncode == 3
    assert "cannot reach the coordinator at http://127.0.0.1:9" in done.stderr


def test_coordinator_without_the_job(tmp_path, signed):
    server = ServerProcess(f"sqlite:///{tmp_path}/l.sqlite", tmp_path)
    server.start()
    try:
        done = join(f"{server.url}/nojob", tmp_path / "d")
    finally:
        server.stop()
    assert done.returncode == 3
    assert "the coordinator has no manifest for job nojob (HTTP 404" in done.stderr


def test_registration_refused_then_accepted_with_the_token(tmp_path, signed):
    folder, job = signed
    secret = tmp_path / "reg-token"
    secret.write_text("s3cret-registration-token\n")
    server = ServerProcess(f"sqlite:///{tmp_path}/l.sqlite", tmp_path, "--manifest-dir",
                           str(folder), "--registration-token-file", str(secret))
    server.start()
    try:
        done = join(f"{server.url}/{job}", tmp_path / "d")
        assert done.returncode == 3, done.stderr
        assert "the coordinator refused to register node vol-" in done.stderr
        assert "HTTP 401" in done.stderr
        done = join(f"{server.url}/{job}", tmp_path / "d", "--registration-token-file",
                    str(tmp_path / "missing"))
        assert done.returncode == 3 and "cannot read the registration token file" in done.stderr
    finally:
        server.stop()


def test_etcd_credentials_refused_stops_the_client(tmp_path, signed):
    """A coordinator that should issue etcd credentials but cannot (its etcd is down)
    stops the client with its answer instead of starting a worker without them."""
    folder, job = signed
    root = tmp_path / "root.password"
    root.write_text("not-a-real-password")
    server = ServerProcess(f"sqlite:///{tmp_path}/l.sqlite", tmp_path, "--manifest-dir",
                           str(folder), "--rendezvous", "etcd://127.0.0.1:9", "--job", job,
                           "--etcd-admin-user", "root", "--etcd-admin-password-file", str(root))
    server.start()
    try:
        done = join(f"{server.url}/{job}", tmp_path / "d")
    finally:
        server.stop()
    assert done.returncode == 3, done.stderr
    assert "the coordinator refused etcd credentials for node vol-" in done.stderr
    assert "HTTP 503" in done.stderr
    assert not list((tmp_path / "d").rglob("*.password"))


def test_bad_settings_are_refused_before_anything_runs(tmp_path):
    done = join("http://127.0.0.1:9/job", tmp_path / "d", "--gpu-memory-fraction", "2")
    assert done.returncode == 2
    assert "gpu_memory_fraction=2.0 must lie between 0.05 and 1.0" in done.stderr


def test_status_without_an_agent(tmp_path):
    done = cli("status", "--data-dir", str(tmp_path))
    assert done.returncode == 2 and "no horde-volunteer agent is running" in done.stderr
