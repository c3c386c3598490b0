"""A volunteer trains under etcd authentication with credentials the coordinator issued.

A real etcd with auth on; the coordinator holds its root identity and serves the signed
manifest; the owner's `horderun` uses a control identity; `horde-volunteer join` registers
its node, fetches the node's own etcd user from the coordinator and hands it to its
worker as HORDE_ETCD_USER plus a 0600 password file. Both train to the end, and the
password appears in no log.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rendezvous.embedded import EmbeddedEtcd
from rendezvous.etcd import EtcdBackend
from rendezvous.etcd_auth import EtcdAuthAdmin, EtcdCredentials
from rendezvous.keys import JobKeys
from rendezvous.settings import DEFAULT_PREFIX
from tests.coordinator.serverproc import ServerProcess
from tests.harness import auth_etcd
from tests.volunteer.conftest import JOB_SCRIPT, VolunteerJob, base_env, cli, records, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = "60"


def test_a_volunteer_trains_with_coordinator_issued_etcd_credentials(tmp_path: Path) -> None:
    with auth_etcd("volauth") as (etcd, job, root_file):
        train_with_issued_credentials(tmp_path, etcd, job, root_file)


def train_with_issued_credentials(tmp_path: Path, etcd: EmbeddedEtcd, job: str,
                                  root_file: Path) -> None:
    server = None
    procs: list[subprocess.Popen] = []
    try:
        root = EtcdCredentials("root", root_file.read_text())
        owner_creds = EtcdAuthAdmin(EtcdBackend(etcd.host, etcd.port, user="root",
                                                password=root.password),
                                    JobKeys(DEFAULT_PREFIX, job)).issue_control("owner")
        job_dir = tmp_path / "jobdir"
        job_dir.mkdir()
        shutil.copy(JOB_SCRIPT, job_dir / "train.py")
        key = tmp_path / "owner.key"
        assert cli("manifest", "keygen", "--key", str(key)).returncode == 0
        server = ServerProcess(f"sqlite:///{tmp_path}/ledger.sqlite", tmp_path,
                               "--rendezvous", etcd.url, "--job", job,
                               "--manifest-dir", str(job_dir), "--etcd-admin-user", "root",
                               "--etcd-admin-password-file", str(root_file))
        server.start()
        vj = VolunteerJob(tmp_path, etcd.url, job, server, job_dir, key)
        vj.sign("train.py", "--steps", STEPS)

        work = tmp_path / "owner"
        shutil.copytree(job_dir, work)
        env = {**base_env(), **owner_creds.to_env(tmp_path / "owner.password")}
        with open(tmp_path / "owner.log", "wb") as log:
            owner = subprocess.Popen(
                [sys.executable, "-m", "elastic.launcher.cli", "-np", "1", "--min-np", "1",
                 "--max-np", "4", "--rendezvous", etcd.url, "--job", job, "--lease-ttl", "2",
                 "--settle-window", "0.3", "--coordinator", server.url, "--node-id-prefix",
                 "owner", sys.executable, "train.py", "--steps", STEPS],
                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        procs.append(owner)
        client, data = vj.volunteer("ann", "--yes")
        procs.append(client)
        wait_for(lambda: sum(map(len, records(data).values())) >= 3, 240,
                 lambda: "ann training: " + vj.log("ann") + vj.log("owner"))
        assert owner.wait(400) == 0, (tmp_path / "owner.log").read_text()[-3000:]
        assert client.wait(120) == 0, vj.log("ann")

        # the worker ran as the node's own etcd user, from a private password file
        files = list((data / "etcd").glob("*.password"))
        assert len(files) == 1, files
        assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
        password = files[0].read_text()
        node = files[0].name[: -len(".password")]
        assert any(r["event"] == "done" for r in records(data)[node])
        for path in (tmp_path / "ann.log", tmp_path / "server.log", *data.rglob("*.log")):
            assert password not in path.read_text(errors="replace"), path
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if server is not None:
            server.stop()
