"""End to end: etcd, the coordinator, the owner's worker and volunteer clients on CPU.

Three volunteers join; one is paused (a graceful leave: its worker's CPU use drops to
~0), one is SIGKILLed (its lease expires), a fourth joins; training finishes with
identical parameters on every member and the ledger credits each node exactly the
samples it contributed.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
import urllib.request

import pytest

from tests.volunteer.conftest import cli, records, status, tree_cpu_seconds, wait_for

pytestmark = pytest.mark.slow
STEPS = "260"


def test_volunteers_train_a_job_to_the_end(volunteer_job):
    vj = volunteer_job
    started = time.monotonic()
    vj.sign("train.py", "--steps", STEPS, "--burn", "10")
    owner = vj.owner("train.py", "--steps", STEPS, "--burn", "10")
    clients = {name: vj.volunteer(name, "--yes") for name in ("ann", "ben", "cat")}
    for name, (_, data) in clients.items():
        wait_for(lambda d=data: len(records(d)) and sum(map(len, records(d).values())) >= 3,
                 180, lambda n=name: f"{n} training: " + vj.log(n))

    # pause ann: a graceful leave that really stops the work
    _, ann = clients["ann"]
    pids = status(ann)["worker_pids"]
    before = tree_cpu_seconds(pids)
    time.sleep(2)
    busy = (tree_cpu_seconds(pids) - before) / 2
    assert cli("pause", "--data-dir", str(ann)).returncode == 0
    wait_for(lambda: not status(ann)["devices"], 20, "ann's worker to stop")
    before = tree_cpu_seconds(pids)
    time.sleep(2)
    idle = (tree_cpu_seconds(pids) - before) / 2
    print(f"ann's worker: {busy:.3f} CPU s/s training, {idle:.4f} paused")
    assert idle < 0.01 and idle < busy / 10

    # SIGKILL ben's client: its launcher and worker die with it, its lease expires
    ben_proc, ben = clients["ben"]
    ben_pids = status(ben)["worker_pids"]
    os.kill(ben_proc.pid, signal.SIGKILL)
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") for p in ben_pids), 20,
             "ben's worker to die with its client")

    # a fourth client joins
    _, dan = vj.volunteer("dan", "--yes")
    assert owner.wait(600) == 0, vj.log("owner")
    for name in ("cat", "dan"):
        proc = clients[name][0] if name in clients else None
        if proc is not None:
            assert proc.wait(60) == 0, vj.log(name)
    elapsed = time.monotonic() - started

    # identical parameters on every member that finished
    done = {}
    for folder in (vj.root / "owner", clients["cat"][1], dan):
        for node, lines in records(folder).items():
            finals = [r["params"] for r in lines if r["event"] == "done"]
            if finals:
                done[node] = finals[-1]
    assert len(done) >= 3 and len(set(done.values())) == 1, done

    # the ledger credits each node exactly what it contributed
    with urllib.request.urlopen(f"{vj.coordinator.url}/api/v1/nodes?limit=100") as answer:
        nodes = {n["node_id"]: n for n in json.loads(answer.read())["nodes"]}
    contributed = {}
    for folder in (vj.root / "owner", ann, ben, clients["cat"][1], dan):
        for node, lines in records(folder).items():
            steps = {(r["generation"], r["step"]): r["samples"] for r in lines
                     if r["event"] == "step"}
            contributed[node] = sum(steps.values())
    print(f"end to end in {elapsed:.0f} s; contributed {contributed}; credit "
          f"{ {k: v['credit'] for k, v in nodes.items()} }")
    for node, samples in contributed.items():
        assert nodes[node]["credit"] == samples, (node, samples, nodes[node])
    assert sqlite3.connect(vj.root / "ledger.sqlite").execute(
        "select count(*) from nodes").fetchone()[0] == len(nodes)
