"""The control plane survives hostile etcd values: real etcd, real `horderun` workers.

Anyone who can reach etcd (before authentication is on) can write any key. Here an
attacker writes malformed values under `nodes/`, `blacklist/`, `leaving/`, the ready
markers and the control keys while a job of two workers trains, and registers nodes that
are not bound to a lease. The job must finish (exit 0) with the parameters of an
untouched run, the workers' log must name each bad key, and no generation may ever list
a node nobody keeps alive.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rendezvous import backend_from_url
from rendezvous.etcd import EtcdBackend
from rendezvous.etcd_auth import ROOT_USER, EtcdAuthAdmin, EtcdCredentials
from rendezvous.generation import NodeInfo
from rendezvous.keys import JobKeys
from rendezvous.settings import DEFAULT_PREFIX
from tests.harness import REPO, horderun, repo_env, unique_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SCRIPT = REPO / "tests" / "elastic" / "scripts" / "elastic_worker.py"
NP = 2
RUN_LIMIT = 120.0  # seconds a job may take before the test calls it hung


class Job:
    """`horderun -np NP` on the shared etcd, its output in a file, always reaped."""

    def __init__(self, etcd_url: str | None, out: Path, *extra: str) -> None:
        self.job = unique_job("ctl")
        self.out = out
        self.log_path = out / "horderun.log"
        (out / "records").mkdir()
        env = repo_env(HORDE_TEST_OUT=str(out / "records"), TEST_EPOCHS="3",
                       TEST_STEP_DELAY="0.1", TEST_COMMIT_EVERY="4")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "elastic.launcher.cli", "-np", str(NP),
             *(["--rendezvous", etcd_url] if etcd_url else []),
             "--job", self.job, "--coordinator", "none", "--lease-ttl", "2",
             "--log-level", "WARNING", *extra, sys.executable, str(SCRIPT)],
            env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait(self, limit: float = RUN_LIMIT) -> int | None:
        """The exit code, or None when it ran past `limit` (then it and its workers die)."""
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if self.proc.poll() is None:
                import os
                import signal

                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            self._log.close()

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        lines = []
        for path in sorted((self.out / "records").glob("*.jsonl")):
            lines += [json.loads(line) for line in path.read_text().splitlines() if line]
        return lines


def final_params(job: Job) -> list[str]:
    return [r["params"] for r in job.records() if r["event"] == "done"]


def watch_generations(backend: EtcdBackend, keys: JobKeys, stop: threading.Event,
                      seen: list[bytes]) -> None:
    """Collect every distinct value of the generation key until `stop`."""
    while not stop.is_set():
        kv = backend.get(keys.generation)
        if kv is not None and (not seen or seen[-1] != kv.value):
            seen.append(kv.value)
        stop.wait(0.05)


def wait_for_training(backend: EtcdBackend, keys: JobKeys, job: Job, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if backend.get(keys.generation) is not None and list((job.out / "records").glob("*")):
            return
        assert job.proc.poll() is None, f"horderun ended before training:\n{job.output}"
        time.sleep(0.1)
    raise AssertionError(f"the job did not start training within {limit} s:\n{job.output}")


@pytest.fixture(scope="module")
def clean_params(etcd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The final parameters of the same job with nobody attacking it."""
    job = Job(etcd_server.url, tmp_path_factory.mktemp("clean"))
    code = job.wait()
    assert code == 0, f"the clean run failed ({code}):\n{job.output}"
    params = final_params(job)
    assert len(params) == NP and len(set(params)) == 1, job.records()
    return params


def test_malformed_values_are_logged_and_ignored_while_training(
        etcd_server: Any, tmp_path: Path, clean_params: list[str]) -> None:
    job = Job(etcd_server.url, tmp_path)
    backend = EtcdBackend(etcd_server.host, etcd_server.port)
    keys = JobKeys(DEFAULT_PREFIX, job.job)
    try:
        wait_for_training(backend, keys, job)
        gen = json.loads(backend.get(keys.generation).value)
        good = NodeInfo(node_id="x", host="h", addr="127.0.0.1", store_port=1).to_json()
        fields = json.loads(good)
        hostile = {
            keys.node("evil-notjson"): b"not json",
            keys.node("evil-list"): b"[1, 2, 3]",
            keys.node("evil-types"): json.dumps({**fields, "node_id": "evil-types",
                                                 "store_port": "29500", "slots": None}).encode(),
            keys.node("evil-port"): json.dumps({**fields, "node_id": "evil-port",
                                                "store_port": 10**30}).encode(),
            keys.node("evil-addr"): json.dumps({**fields, "node_id": "evil-addr",
                                                "addr": "not a host:port; rm -rf"}).encode(),
            keys.node("evil-huge"): json.dumps({**fields, "node_id": "evil-huge",
                                                "host": "h" * 200_000}).encode(),
            keys.node("evil-utf8"): b"\xff\xfe\x00garbage",
            keys.blacklisted("evil-bl"): b"not json",
            # a garbage entry for a real member: not an eviction
            keys.blacklisted(gen["members"][-1]["node_id"]): json.dumps(
                {"node_id": 7, "reason": [], "until": "soon"}).encode(),
            keys.leaving_node("evil-leave"): b"\xff\xfe",
            keys.ready + "evil/ready": b"1",
            keys.ready_node("evil-ready"): b'{"generation": "1", "reset": true}',
            keys.reset: b"not json",
            keys.status: b'{"state": "exploded"}',
            keys.activity_node("evil-act"): b'{"rank": Infinity}',
        }
        for key, value in hostile.items():
            backend.put(key, value)
        # A key that is not UTF-8 (etcd keys are bytes), written through the gateway.
        raw_key = keys.nodes.encode() + b"evil-\xff"
        backend._post("put", "/kv/put", {"key": base64.b64encode(raw_key).decode(),
                                         "value": base64.b64encode(good).decode()})
        # A leader key bound to no lease (it would never expire): a candidate replaces it.
        backend.put(keys.leader, b"\xff\xfe not a node")
        # The generation key last: members keep following the generation they had.
        backend.put(keys.generation, b"not json")
        code = job.wait()
    finally:
        job.wait(0)
        backend.close()
    output = job.output
    assert code == 0, f"horderun exited {code} (None: hung past {RUN_LIMIT} s):\n{output}"
    assert "Traceback" not in output, output
    for name in ("nodes/evil-notjson", "nodes/evil-list", "nodes/evil-types",
                 "nodes/evil-port", "nodes/evil-addr", "nodes/evil-huge", "nodes/evil-utf8",
                 "blacklist/evil-bl", "control/reset", "control/status",
                 "nodes/evil-\\xff", "control/leader", "ready/evil-ready"):
        assert f"ignoring etcd key /{DEFAULT_PREFIX}/{job.job}/{name} " in output, (name, output)
    params = final_params(job)
    assert params == clean_params, f"parameters differ from the untouched run\n{output}"


def test_registrations_without_a_live_lease_are_never_admitted(
        etcd_server: Any, tmp_path: Path, clean_params: list[str]) -> None:
    # max-np 3: a third registered node would be admitted at once if it counted.
    job = Job(etcd_server.url, tmp_path, "--min-np", str(NP), "--max-np", str(NP + 1))
    backend = EtcdBackend(etcd_server.host, etcd_server.port)
    keys = JobKeys(DEFAULT_PREFIX, job.job)
    stop = threading.Event()
    seen: list[bytes] = []
    watcher = threading.Thread(target=watch_generations, args=(backend, keys, stop, seen),
                               daemon=True)
    try:
        wait_for_training(backend, keys, job)
        watcher.start()
        dead = backend.grant_lease(1)
        backend.revoke_lease(dead)
        ghosts = {
            "ghost-nolease": 0,  # says it has no lease, and is bound to none
            "ghost-deadlease": dead,  # names a lease that no longer exists
        }
        for name, lease in ghosts.items():
            info = NodeInfo(node_id=name, host="127.0.0.1", addr="127.0.0.1", store_port=29999,
                            lease=lease, registered_at=time.time(), order=-1)
            backend.put(keys.node(name), info.to_json())
        code = job.wait()
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(5)
        job.wait(0)
        backend.close()
    output = job.output
    assert code == 0, f"horderun exited {code} (None: hung past {RUN_LIMIT} s):\n{output}"
    members = [[m["node_id"] for m in json.loads(value)["members"]] for value in seen]
    assert members, "no generation was seen"
    assert not any(g.startswith("ghost-") for ms in members for g in ms), members
    assert len(seen) == 1, f"the job changed generation: {members}\n{output}"
    assert {r["generation"] for r in job.records()} == {0}, job.records()
    for name in ghosts:
        assert (f"ignoring etcd key /{DEFAULT_PREFIX}/{job.job}/nodes/{name} " in output
                and "not bound to a lease" in output), (name, output)
    assert final_params(job) == clean_params, output


def test_leaseless_keys_do_not_keep_the_embedded_etcd_up(tmp_path: Path) -> None:
    """An elastic job on horderun's own etcd waits for joined workers' registrations to go
    before it stops etcd; a key under `nodes/` that no lease will ever delete must not
    count as one, nor may garbage there stop the job from finishing. Written as volunteers
    can under etcd auth (the default): each with its own node user, into its own key."""
    job = Job(None, tmp_path, "--min-np", "1", "--max-np", str(NP))
    backends: list[EtcdBackend] = []
    try:
        deadline = time.monotonic() + 60
        url = root_file = None
        while root_file is None and time.monotonic() < deadline and job.proc.poll() is None:
            found = re.search(r"on rendezvous (etcd://\S+)", job.output)
            url = found.group(1) if found else None
            found = re.search(r"root password in (\S+)\)", job.output)
            root_file = found.group(1) if found and url else None
            time.sleep(0.1)
        assert url and root_file, f"horderun did not say where its etcd is:\n{job.output}"
        root = EtcdCredentials(ROOT_USER, Path(root_file).read_text(encoding="utf-8"))
        backends.append(backend_from_url(url, credentials=root))
        keys = JobKeys(DEFAULT_PREFIX, job.job)
        admin = EtcdAuthAdmin(backends[0], keys)  # type: ignore[arg-type]
        wait_for_training(backends[0], keys, job)  # type: ignore[arg-type]
        ghost = NodeInfo(node_id="ghost", host="127.0.0.1", addr="127.0.0.1", store_port=1)
        for node_id, value in (("ghost", ghost.to_json()), ("garbage", b"not json")):
            volunteer = backend_from_url(url, credentials=admin.issue_node(node_id))
            backends.append(volunteer)  # type: ignore[arg-type]
            volunteer.put(keys.node(node_id), value)  # no lease
        code = job.wait()
    finally:
        job.wait(0)
        for backend in backends:
            backend.close()
    assert code == 0, f"horderun exited {code} (None: hung past {RUN_LIMIT} s):\n{job.output}"
    assert "Traceback" not in job.output, job.output


def test_join_with_an_unreadable_job_config_says_why(etcd_server: Any) -> None:
    backend = EtcdBackend(etcd_server.host, etcd_server.port)
    job = unique_job("ctl-cfg")
    keys = JobKeys(DEFAULT_PREFIX, job)
    try:
        for value in (b"not json", b'{"rendezvous": {"LD_PRELOAD": "/tmp/x.so"}, '
                                   b'"HORDE_COLLECTIVE_TIMEOUT": "30"}'):
            backend.put(keys.config, value)
            result = horderun("--join", "--rendezvous", etcd_server.url, "--job", job,
                              "-np", "1", sys.executable, "-c", "pass", timeout=60)
            text = result.stdout + result.stderr
            assert result.returncode != 0, text
            assert "Traceback" not in text, text
            assert f"{keys.config}" in text and "cannot be used" in text, text
    finally:
        backend.delete(keys.config)
        backend.close()
