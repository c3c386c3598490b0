"""etcd authentication and per-node roles: a real etcd with auth on, real `horderun` jobs.

A volunteer's etcd user may write only its own keys: etcd itself refuses (permission
denied) its writes to the generation, leader, status, config, blacklist and other nodes'
registrations, while the job (run by a trusted control identity) trains to the end. A
revoked node's user stops working at once, its old token included.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rendezvous import backend_from_url
from rendezvous.embedded import EmbeddedEtcd, etcd_binary
from rendezvous.errors import RendezvousError, RendezvousPermissionError
from rendezvous.etcd import EtcdBackend
from rendezvous.etcd_auth import EtcdAuthAdmin, EtcdCredentials
from rendezvous.keys import JobKeys
from rendezvous.settings import DEFAULT_PREFIX
from tests.harness import REPO, repo_env, unique_job
from tests.harness import auth_etcd as harness_auth_etcd

pytestmark = [pytest.mark.timeout(300)]

SCRIPT = REPO / "tests" / "elastic" / "scripts" / "elastic_worker.py"


@pytest.fixture
def auth_etcd() -> Iterator[tuple[EmbeddedEtcd, str, EtcdCredentials]]:
    """A fresh etcd with auth on for one job: (server, job, root credentials)."""
    with harness_auth_etcd("auth") as (server, job, root_file):
        yield server, job, EtcdCredentials("root", root_file.read_text())


def _client(server: EmbeddedEtcd, creds: EtcdCredentials | None) -> EtcdBackend:
    backend = backend_from_url(server.url, credentials=creds)
    assert isinstance(backend, EtcdBackend)
    return backend


def _forbidden_keys(keys: JobKeys) -> list[str]:
    return [keys.generation, keys.leader, keys.status, keys.reset, keys.config,
            keys.blacklisted("volunteer-1"), keys.blacklisted("worker-0"),
            keys.node("worker-0"), keys.activity_node("worker-0"),
            keys.leaving_node("worker-0")]



@contextlib.contextmanager
def _horderun(args: list[str], env: dict[str, str], log_path: Path
              ) -> Iterator[subprocess.Popen[bytes]]:
    """`horderun ARGS python SCRIPT` in a session of its own, its output in `log_path`;
    SIGKILLed with its workers if it still runs at the end."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "elastic.launcher.cli", *args, sys.executable, str(SCRIPT)],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

def test_root_password_file_is_private_and_unauthenticated_clients_are_refused(
        auth_etcd: tuple[EmbeddedEtcd, str, EtcdCredentials]) -> None:
    server, job, root = auth_etcd
    path = server.data_dir / "root.password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert root.password not in server.log_path.read_text(errors="replace")
    keys = JobKeys(DEFAULT_PREFIX, job)
    with pytest.raises(RendezvousPermissionError, match="unauthenticated"):
        _client(server, None).put(keys.generation, b"{}")
    with pytest.raises(RendezvousPermissionError, match="refused user 'root'"):
        _client(server, EtcdCredentials("root", "wrong")).get(keys.generation)


def test_volunteer_cannot_write_control_keys_and_the_job_goes_on(
        auth_etcd: tuple[EmbeddedEtcd, str, EtcdCredentials], tmp_path: Path) -> None:
    server, job, root = auth_etcd
    keys = JobKeys(DEFAULT_PREFIX, job)
    admin = EtcdAuthAdmin(_client(server, root), keys)
    launcher = admin.issue_control("launcher")
    volunteer = admin.issue_node("volunteer-1")
    env = repo_env(HORDE_TEST_OUT=str(tmp_path), TEST_EPOCHS="3", TEST_STEP_DELAY="0.1",
                   TEST_COMMIT_EVERY="4",
                   **launcher.to_env(password_file=tmp_path / "launcher.password"))
    log_path = tmp_path / "horderun.log"
    with _horderun(["-np", "2", "--rendezvous", server.url, "--job", job, "--coordinator",
                    "none", "--lease-ttl", "2", "--log-level", "WARNING"], env, log_path) as proc:
        attacker = _client(server, volunteer)
        deadline = time.monotonic() + 90
        while attacker.get(keys.generation) is None:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "no generation within 90 s"
            time.sleep(0.1)
        denied = []
        for key in _forbidden_keys(keys):
            with pytest.raises(RendezvousPermissionError, match="permission denied"):
                attacker.put(key, b'{"forged": true}')
            denied.append(key)
        with pytest.raises(RendezvousPermissionError, match="permission denied"):
            attacker.delete_prefix(keys.nodes)
        # What a member must do still works: read the job, write its own keys.
        lease = attacker.grant_lease(5)
        attacker.put(keys.node("volunteer-1"), b"{}", lease=lease)
        attacker.put(keys.activity_node("volunteer-1"), b"{}", lease=lease)
        assert attacker.get_prefix(keys.nodes)[0]
        attacker.revoke_lease(lease)
        code = proc.wait(120)
    output = log_path.read_text(errors="replace")
    assert code == 0, output
    assert len(denied) == len(_forbidden_keys(keys))
    assert launcher.password not in output


def test_revoked_node_cannot_write_anymore(
        auth_etcd: tuple[EmbeddedEtcd, str, EtcdCredentials]) -> None:
    server, job, root = auth_etcd
    keys = JobKeys(DEFAULT_PREFIX, job)
    admin = EtcdAuthAdmin(_client(server, root), keys)
    creds = admin.issue_node("volunteer-2")
    node = _client(server, creds)
    node.put(keys.node("volunteer-2"), b"{}")  # holds a valid token now
    assert admin.revoke_node("volunteer-2") is True
    with pytest.raises(RendezvousPermissionError, match="volunteer-2"):
        node.put(keys.node("volunteer-2"), b"{}")
    with pytest.raises(RendezvousPermissionError):
        _client(server, creds).get(keys.generation)
    # Issuing again gives a new password; the old one stays refused.
    fresh = admin.issue_node("volunteer-2")
    assert fresh.password != creds.password
    _client(server, fresh).put(keys.node("volunteer-2"), b"{}")
    with pytest.raises(RendezvousPermissionError):
        _client(server, creds).put(keys.node("volunteer-2"), b"{}")
    assert admin.revoke_node("never-issued") is False


def test_credentials_from_env_say_what_is_missing(tmp_path: Path) -> None:
    assert EtcdCredentials.from_env({}) is None
    with pytest.raises(ValueError, match="no password was given"):
        EtcdCredentials.from_env({"HORDE_ETCD_USER": "n1"})
    with pytest.raises(ValueError, match="cannot be read"):
        EtcdCredentials.from_env({"HORDE_ETCD_USER": "n1",
                                  "HORDE_ETCD_PASSWORD_FILE": str(tmp_path / "absent")})
    env = EtcdCredentials("n1", "s3cret").to_env(password_file=tmp_path / "pw")
    assert stat.S_IMODE((tmp_path / "pw").stat().st_mode) == 0o600
    creds = EtcdCredentials.from_env(env)
    assert creds == EtcdCredentials("n1", "s3cret")
    assert "s3cret" not in repr(creds)
    with pytest.raises(ValueError, match="not usable as an etcd name"):
        EtcdAuthAdmin(EtcdBackend("127.0.0.1", 1), JobKeys("horde", "j")).node_user("a/b")


class Node:
    """`agent_node.py NODE` in its own process with its own etcd credentials; killed at the
    end (SIGKILL: no deregistration, its lease runs out as after a crash)."""

    def __init__(self, server: EmbeddedEtcd, job: str, node_id: str,
                 creds: EtcdCredentials, folder: Path) -> None:
        self.node_id = node_id
        self.log_path = folder / f"{node_id}.log"
        env = repo_env(TEST_JOB=job, TEST_ETCD=server.url,
                       **creds.to_env(password_file=folder / f"{node_id}.password"))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "security" / "scripts" / "agent_node.py"),
             node_id], env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


def _wait_for(what: str, check: object, nodes: list[Node], limit: float = 45) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    logs = "\n".join(f"--- {n.node_id}:\n{n.output}" for n in nodes)
    raise AssertionError(f"{what} did not happen within {limit} s\n{logs}")


def test_only_trusted_nodes_lead_failover_and_waiting(
        auth_etcd: tuple[EmbeddedEtcd, str, EtcdCredentials], tmp_path: Path) -> None:
    server, job, root = auth_etcd
    keys = JobKeys(DEFAULT_PREFIX, job)
    admin = EtcdAuthAdmin(_client(server, root), keys)
    observer = _client(server, root)

    def leader() -> str | None:
        kv = observer.get(keys.leader)
        return kv.value.decode() if kv is not None else None

    # The untrusted volunteer starts first, alone: it may not lead, so it waits and says so.
    volunteer = Node(server, job, "volunteer-1", admin.issue_node("volunteer-1"), tmp_path)
    nodes = [volunteer]
    try:
        _wait_for("the volunteer's 'no trusted control node alive' warning",
                  lambda: "no trusted control node alive; waiting" in volunteer.output, nodes)
        assert "may not lead" in volunteer.output
        assert leader() is None
        trusted = [Node(server, job, f"trusted-{i}", admin.issue_control(f"trusted-{i}"),
                        tmp_path) for i in range(2)]
        nodes += trusted
        _wait_for("a trusted leader", lambda: leader() in ("trusted-0", "trusted-1"), nodes)
        first = next(n for n in trusted if n.node_id == leader())
        second = next(n for n in trusted if n is not first)
        first.kill()  # a crash: its leader key goes when its 2 s lease runs out
        _wait_for("failover to the other trusted node", lambda: leader() == second.node_id,
                  nodes)
        _wait_for("the new leader to act as one",
                  lambda: f"leader {second.node_id}" in second.output, nodes)
        mark = len(volunteer.output)
        second.kill()
        _wait_for("the leader key to expire", lambda: leader() is None, nodes)
        _wait_for("the volunteer's warning again",
                  lambda: "no trusted control node alive; waiting" in volunteer.output[mark:],
                  nodes, limit=30)
        assert leader() is None
        assert volunteer.proc.poll() is None, volunteer.output  # it waits, it does not die
        assert "leader volunteer-1" not in volunteer.output
    finally:
        for node in nodes:
            node.kill()


def _horderun_job(tmp_path: Path, name: str, epochs: int) -> tuple[str, dict[str, str]]:
    """A job name and the environment of a `horderun --etcd-auth` test job (no etcd
    credentials of the caller's own); skips without the etcd binary."""
    try:
        etcd_binary()
    except RendezvousError as exc:
        pytest.skip(f"no etcd binary: {exc}")
    env = repo_env(HORDE_TEST_OUT=str(tmp_path), TEST_EPOCHS=str(epochs),
                   TEST_STEP_DELAY="0.1", TEST_COMMIT_EVERY="4")
    for name_ in ("HORDE_ETCD_USER", "HORDE_ETCD_PASSWORD", "HORDE_ETCD_PASSWORD_FILE"):
        env.pop(name_, None)
    return unique_job(name), env


def test_horderun_etcd_auth_runs_a_job_and_refuses_strangers(tmp_path: Path) -> None:
    """A plain `horderun` (authentication is the embedded etcd's default): the etcd refuses
    a client without credentials, and a --join without credentials or a coordinator that
    could issue them is told what to pass, while the job, whose workers hold their own
    control identities, trains to the end."""
    job, env = _horderun_job(tmp_path, "authrun", epochs=3)
    env.pop("HORDE_ETCD_AUTH", None)
    log_path = tmp_path / "horderun.log"
    keys = JobKeys(DEFAULT_PREFIX, job)
    with _horderun(["-np", "2", "--job", job, "--coordinator", "none", "--lease-ttl", "2",
                    "--log-level", "INFO"], env, log_path) as proc:
        deadline = time.monotonic() + 90
        url = None
        while url is None:
            found = re.search(r"etcd://127\.0\.0\.1:\d+", log_path.read_text(errors="replace"))
            url = found.group(0) if found else None
            assert proc.poll() is None or url, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "no rendezvous URL printed within 90 s"
            time.sleep(0.1)
        stranger = backend_from_url(url, credentials=None)
        with pytest.raises(RendezvousPermissionError):
            stranger.put(keys.generation, b"{}")
        joiner = subprocess.run(
            [sys.executable, "-m", "elastic.launcher.cli", "--join", "--rendezvous", url,
             "--job", job, "--coordinator", "none", "-np", "1", sys.executable,
             str(SCRIPT)], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert joiner.returncode != 0
        assert "runs with authentication: join with the --coordinator URL" in joiner.stderr
        assert "HORDE_ETCD_USER" in joiner.stderr and "Traceback" not in joiner.stderr
        # `--status` needs the owner's root identity, and says so without it
        status = [sys.executable, "-m", "elastic.launcher.cli", "--status",
                  "--rendezvous", url, "--job", job]
        refused = subprocess.run(status, env=env, cwd=REPO, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode != 0 and "HORDE_ETCD_USER=root" in refused.stderr
        found = re.search(r"root password in (\S+)\)", log_path.read_text(errors="replace"))
        assert found, log_path.read_text(errors="replace")
        shown = subprocess.run(status, cwd=REPO, capture_output=True, text=True, timeout=60,
                               env={**env, "HORDE_ETCD_USER": "root",
                                    "HORDE_ETCD_PASSWORD_FILE": found.group(1)})
        assert shown.returncode == 0 and f"job {job}: status" in shown.stdout, shown.stderr
        code = proc.wait(120)
    output = log_path.read_text(errors="replace")
    assert code == 0, output
    assert "authentication on" in output
    assert "WITHOUT AUTHENTICATION" not in output


def test_horderun_no_etcd_auth_opts_out(tmp_path: Path) -> None:
    """`horderun --no-etcd-auth`: the embedded etcd runs open (for a trusted network), so
    a client without credentials reads the job; the job still trains to the end."""
    job, env = _horderun_job(tmp_path, "noauth", epochs=2)
    keys = JobKeys(DEFAULT_PREFIX, job)
    log_path = tmp_path / "horderun.log"
    with _horderun(["-np", "1", "--no-etcd-auth", "--job", job, "--coordinator", "none"],
                   env, log_path) as proc:
        deadline = time.monotonic() + 90
        config = None
        while config is None:
            found = re.search(r"etcd://127\.0\.0\.1:\d+", log_path.read_text(errors="replace"))
            if found:
                config = backend_from_url(found.group(0), credentials=None).get(keys.config)
            assert proc.poll() is None or config, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "no job settings readable within 90 s"
            time.sleep(0.1)
        code = proc.wait(120)
    output = log_path.read_text(errors="replace")
    assert code == 0, output
    assert "authentication on" not in output


def test_horderun_etcd_auth_revokes_a_blacklisted_worker(tmp_path: Path) -> None:
    """Blacklisting a worker of `horderun --etcd-auth` deletes its etcd user: the password
    it was given is refused from then on, while the job goes on without it."""
    import json

    job, env = _horderun_job(tmp_path, "authbl", epochs=40)
    log_path = tmp_path / "horderun.log"
    keys = JobKeys(DEFAULT_PREFIX, job)

    def output() -> str:
        return log_path.read_text(errors="replace")

    with _horderun(["-np", "2", "--min-np", "1", "--max-np", "2", "--etcd-auth", "--job", job,
                    "--coordinator", "none", "--lease-ttl", "2"], env, log_path) as proc:
        deadline = time.monotonic() + 90
        root_file, url, root = _await_first_generation(proc, output, keys, deadline)
        victim = json.loads(root.get_prefix(keys.nodes)[0][-1].value)
        user = f"horde-control-{job}-{victim['node_id']}"
        password = (root_file.parent / f"worker-{victim['order']}.password").read_text()
        _client_url(url, EtcdCredentials(user, password)).get(keys.generation)  # works
        from rendezvous.agent import blacklist_node

        blacklist_node(root, keys, victim["node_id"], "test eviction", None)
        while f"revoked the etcd credentials of blacklisted node {victim['node_id']}" \
                not in output():
            assert proc.poll() is None and time.monotonic() < deadline + 30, output()
            time.sleep(0.1)
        with pytest.raises(RendezvousPermissionError, match="refused user"):
            _client_url(url, EtcdCredentials(user, password)).get(keys.generation)


def _await_first_generation(proc: subprocess.Popen, output: Callable[[], str], keys: JobKeys,
                            deadline: float) -> tuple[Path, str, EtcdBackend]:
    """Wait until `horderun --etcd-auth` printed its etcd and root password file and its
    first generation exists: (root password file, etcd URL, a root client)."""
    password_line, etcd_url = r"root password in (\S+)\)", r"etcd://127\.0\.0\.1:\d+"
    while not (re.search(password_line, output()) and re.search(etcd_url, output())):
        assert proc.poll() is None, output()
        assert time.monotonic() < deadline, output()
        time.sleep(0.1)
    root_file = Path(re.search(password_line, output()).group(1))
    url = re.search(etcd_url, output()).group(0)
    root = _client_url(url, EtcdCredentials("root", root_file.read_text()))
    while root.get(keys.generation) is None:
        assert proc.poll() is None and time.monotonic() < deadline, output()
        time.sleep(0.1)
    return root_file, url, root


def _client_url(url: str, creds: EtcdCredentials) -> EtcdBackend:
    backend = backend_from_url(url, credentials=creds)
    assert isinstance(backend, EtcdBackend)
    return backend


def _records(folder: Path) -> list[dict[str, object]]:
    import json

    lines: list[dict[str, object]] = []
    for path in sorted(folder.glob("*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line]
    return lines


def test_horderun_etcd_auth_volunteer_with_only_its_own_keys_trains_to_the_end(
        tmp_path: Path) -> None:
    """A volunteer whose etcd user may write only its own keys joins `horderun --etcd-auth`
    (`horderun --join`), takes part in the generations after it (its readiness and reset
    requests go to its own key `ready/<node>`) and ends with the same parameters as the
    owner's workers; etcd still refuses its writes of the generation, leader, status,
    reset and blacklist."""

    try:
        etcd_binary()
    except RendezvousError as exc:
        pytest.skip(f"no etcd binary: {exc}")
    job = unique_job("authvol")
    out = tmp_path / "records"
    out.mkdir()
    env = repo_env(HORDE_TEST_OUT=str(out), TEST_EPOCHS="12", TEST_STEP_DELAY="0.1",
                   TEST_COMMIT_EVERY="4")
    for name in ("HORDE_ETCD_USER", "HORDE_ETCD_PASSWORD", "HORDE_ETCD_PASSWORD_FILE"):
        env.pop(name, None)
    log_path, join_log_path = tmp_path / "horderun.log", tmp_path / "join.log"
    keys = JobKeys(DEFAULT_PREFIX, job)

    def output() -> str:
        return log_path.read_text(errors="replace")

    with open(log_path, "wb") as log, open(join_log_path, "wb") as join_log:
        owner = subprocess.Popen(
            [sys.executable, "-m", "elastic.launcher.cli", "-np", "2", "--min-np", "2",
             "--max-np", "3", "--etcd-auth", "--job", job, "--coordinator", "none",
             "--lease-ttl", "30", "--collective-timeout", "4", "--reset-timeout", "10",
             sys.executable, str(SCRIPT)],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        joiner: subprocess.Popen[bytes] | None = None
        try:
            deadline = time.monotonic() + 90
            root_file, url, root = _await_first_generation(owner, output, keys, deadline)
            # The owner issues the volunteer a per-node identity (its own keys only).
            creds = EtcdAuthAdmin(root, keys).issue_node("volunteer-0")
            join_env = {**env, **creds.to_env(password_file=tmp_path / "volunteer.password")}
            joiner = subprocess.Popen(
                [sys.executable, "-m", "elastic.launcher.cli", "--join", "--rendezvous", url,
                 "--job", job, "--coordinator", "none", "--node-id-prefix", "volunteer",
                 "-np", "1", sys.executable, str(SCRIPT)],
                env=join_env, cwd=REPO, stdout=join_log, stderr=subprocess.STDOUT,
                start_new_session=True)
            volunteer = _client_url(url, creds)
            for key in (keys.generation, keys.leader, keys.status, keys.reset,
                        keys.blacklisted("volunteer-0"), keys.ready_node("worker-0"),
                        keys.trusted_node("volunteer-0")):
                with pytest.raises(RendezvousPermissionError, match="permission denied"):
                    volunteer.put(key, b'{"generation": 0}')
            # The owner's workers carry trust marks (ranked first); the volunteer none.
            marks = {kv.key[len(keys.trusted):] for kv in volunteer.get_prefix(keys.trusted)[0]}
            assert len(marks) == 2 and "volunteer-0" not in marks, marks
            # Once the volunteer trains, one of the owner's workers hangs past the collective
            # timeout (its lease outlives the hang): the collective fails with every member
            # alive, so each, the volunteer among them, must say it is ready again (the
            # volunteer only through its own key) or be dropped as unresponsive.
            while not any(r["node"] == "volunteer-0" and r["event"] == "commit"
                          for r in _records(out)):
                assert joiner.poll() is None and owner.poll() is None, output()
                assert time.monotonic() < deadline + 90, output()
                time.sleep(0.1)
            victim = next(r for r in _records(out) if r["node"] != "volunteer-0")
            os.kill(int(victim["pid"]), signal.SIGSTOP)  # type: ignore[call-overload]
            time.sleep(6)
            os.kill(int(victim["pid"]), signal.SIGCONT)  # type: ignore[call-overload]
            joined = joiner.wait(180)
            code = owner.wait(120)
        finally:
            for proc in (owner, joiner):
                if proc is not None and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
    logs = output() + "\n--- join:\n" + join_log_path.read_text(errors="replace")
    assert joined == 0 and code == 0, logs
    done = {r["node"]: r["params"] for r in _records(out) if r["event"] == "done"}
    assert "volunteer-0" in done and len(done) == 3, (done, logs)
    assert "reset of generation" in logs and "collective failure reported" in logs, logs
    assert "unresponsive" not in logs, logs
    assert len(set(done.values())) == 1, (done, logs)
    assert creds.password not in logs
