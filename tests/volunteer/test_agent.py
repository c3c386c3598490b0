"""The agent with real processes: join, pause (its worker's CPU use drops to ~0), resume
(a join under the same node id), leave; refusals of a changed job; crash restarts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.volunteer.conftest import (
    base_env,
    cli,
    records,
    status,
    tree_cpu_seconds,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_join_pause_resume_leave(volunteer_job):
    vj = volunteer_job
    vj.sign("train.py", "--steps", "100000", "--burn", "30")
    owner = vj.owner("train.py", "--steps", "100000")
    agent, data = vj.volunteer("alice", "--yes")
    st = wait_for(lambda: (s := status(data))["state"] == "training" and s, 120,
                  lambda: "alice training: " + vj.log("alice"))
    assert st["job"] == vj.job and st["generation"] is not None
    assert st["devices"] == ["cpu"] and st["confirmed"]
    assert any("running on the CPU" in n for n in st["notes"])
    wait_for(lambda: sum(len(v) for v in records(data).values()) >= 5, 120,
             lambda: "alice's worker to make steps: " + vj.log("alice"))
    pids = status(data)["worker_pids"]
    before = tree_cpu_seconds(pids)
    time.sleep(3.0)
    busy = (tree_cpu_seconds(pids) - before) / 3.0
    assert busy > 0.05, f"the worker should be training ({busy:.2f} CPU s/s)"

    paused_at = time.monotonic()
    done = cli("pause", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    st = wait_for(lambda: (s := status(data))["state"] == "paused" and not s["devices"] and s,
                  15, "the pause to stop the worker")
    stopped_in = time.monotonic() - paused_at
    assert "paused by you" in st["reason"]
    before = tree_cpu_seconds(pids)
    time.sleep(3.0)
    idle = (tree_cpu_seconds(pids) - before) / 3.0
    print(f"worker CPU: {busy:.2f} CPU s/s training, {idle:.3f} after pause; "
          f"stopped {stopped_in:.1f} s after pause")
    assert idle < 0.01 and idle < busy / 10
    assert owner.poll() is None  # the job goes on without alice

    done = cli("resume", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    st = wait_for(lambda: (s := status(data))["state"] == "training" and s, 90,
                  lambda: "alice training again: " + vj.log("alice"))
    node = next(iter(st["ranks"]))
    assert node.endswith("-cpu-0")
    wait_for(lambda: len({r["generation"] for r in records(data)[node]
                          if r["event"] == "step"}) >= 2, 90,
             "steps in a second generation under the same node id")

    with urllib.request.urlopen(f"{vj.coordinator.url}/api/v1/nodes/{node}") as answer:
        registered = json.loads(answer.read())
    assert registered["owner"] == st["client_id"]  # registered by the client, not the worker
    assert set(registered["hardware"]) == {"cpu", "cpus"}  # what docs/volunteer.md lists

    done = cli("status", "--data-dir", str(data))
    assert "state:      training" in done.stdout and "credit:" in done.stdout
    done = cli("leave", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    assert agent.wait(30) == 0
    assert not (data / "agent.json").exists()


def test_a_changed_script_is_refused_by_the_agent(volunteer_job):
    vj = volunteer_job
    vj.sign("train.py")
    (vj.job_dir / "train.py").write_text("import os; os.system('echo pwned')\n")
    agent, data = vj.volunteer("bob")
    assert agent.wait(60) == 4
    assert "differs from the signed manifest" in vj.log("bob")
    assert not records(data)


def test_a_manifest_signed_by_another_key_is_refused(volunteer_job, tmp_path):
    vj = volunteer_job
    vj.sign("train.py")
    agent, data = vj.volunteer("carol", "--yes")
    wait_for(lambda: (data / "pins").exists() and any((data / "pins").iterdir()), 60,
             lambda: "the owner key to be pinned: " + vj.log("carol"))
    cli("leave", "--data-dir", str(data))
    agent.wait(30)
    other = tmp_path / "mallory.key"
    assert cli("manifest", "keygen", "--key", str(other)).returncode == 0
    vj.owner_key = other
    vj.sign("train.py")
    agent, _ = vj.volunteer("carol", "--yes")
    assert agent.wait(60) == 4
    assert "the job owner's key changed" in vj.log("carol")


def test_fresh_install_waits_for_confirmation(volunteer_job):
    vj = volunteer_job
    vj.sign("train.py", "--steps", "100000")
    vj.owner("train.py", "--steps", "100000")
    agent, data = vj.volunteer("dave")  # no --yes
    st = wait_for(lambda: (s := status(data))["state"] == "paused" and s, 60,
                  lambda: "the agent to wait for confirmation: " + vj.log("dave"))
    assert "confirm" in st["reason"] and not st["devices"]
    text = vj.log("dave")
    assert "Runs: python train.py --steps 100000" in text and "The project sees" in text
    time.sleep(2)
    assert not records(data)  # nothing ran before the volunteer said yes
    assert cli("confirm", "--data-dir", str(data)).returncode == 0
    wait_for(lambda: status(data)["state"] == "training", 90, "training after confirm")
    cli("leave", "--data-dir", str(data))
    assert agent.wait(30) == 0


def test_repeated_crashes_stop_the_client_with_a_reason(volunteer_job):
    vj = volunteer_job
    (vj.job_dir / "train.py").write_text("raise SystemExit(7)\n")
    vj.sign("train.py")
    agent, _ = vj.volunteer("erin", "--yes", "--max-restarts", "2")
    vj.procs.append(agent)
    code = agent.wait(120)
    text = vj.log("erin")
    assert code == 3, text
    assert "crashed 3 times" in text and "not restarting" in text
    assert text.count("restarting in") == 2  # backoff 2 s, then 4 s


def test_an_evicted_node_is_not_restarted(volunteer_job):
    vj = volunteer_job
    vj.sign("train.py", "--steps", "100000")
    vj.owner("train.py", "--steps", "100000")
    agent, data = vj.volunteer("fred", "--yes")
    st = wait_for(lambda: (s := status(data))["state"] == "training" and s, 180,
                  lambda: "fred training: " + vj.log("fred"))
    node = next(iter(st["ranks"]))
    done = subprocess.run([sys.executable, "-m", "elastic.launcher.cli", "--evict", node,
                           "--reason", "sent NaN gradients", "--rendezvous", vj.etcd_url,
                           "--job", vj.job], capture_output=True, text=True, timeout=60,
                          env=base_env())
    assert done.returncode == 0, done.stderr
    code = agent.wait(120)
    text = vj.log("fred")
    assert code == 3, text
    assert "the job evicted this node" in text and "sent NaN gradients" in text
    assert "restarting in" not in text
