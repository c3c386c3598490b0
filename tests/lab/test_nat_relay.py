"""Volunteers behind NAT: the owner serves a job from a public namespace; two volunteers
behind different masquerading routers (no inbound connections) paste the printed join
command, train to the end with the owner through the relay with identical parameters, and
earn credit; one of them is SIGKILLed and the others go on."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.harness import repo_env
from tests.lab.netns import NatLab
from tests.lab.test_public_join import SCRIPT, _credit, _join_line, _records, _wait

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]


def _commits(folder: Path, size: int) -> list[dict]:
    return [r for r in _records(folder) if r["event"] == "commit" and r["size"] == size]


class OwnerRun(NamedTuple):
    """The owner's `horderun --listen` in the public namespace, and what its test needs."""

    outs: dict[str, Path]  # each member's result folder, by name ("owner", homes...)
    logs: dict[str, Path]
    stop: Path  # the file whose creation ends the job
    db: Path  # the embedded coordinator's ledger
    common: dict[str, str]  # environment every member's script gets
    owner: subprocess.Popen
    all_logs: list[Path]
    argv: list[str]  # the join command the owner printed


def start_owner(lab: NatLab, tmp_path: Path, homes: tuple[str, ...]) -> OwnerRun:
    """Start the owner's job (one local worker, room for the homes) and wait for the join
    command it prints."""
    outs = {name: tmp_path / name for name in ("owner", *homes)}
    for folder in outs.values():
        folder.mkdir()
    stop, db = tmp_path / "stop", tmp_path / "ledger.sqlite"
    logs = {name: tmp_path / f"{name}.log" for name in outs}
    common = {"TEST_EPOCHS": "1000", "TEST_STOP_FILE": str(stop), "TEST_STEP_DELAY": "0.05",
              "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    owner = lab.popen(lab.ns_pub, [
        sys.executable, "-m", "elastic.launcher.cli", "-np", "1", "--min-np", "1",
        "--max-np", str(1 + len(homes)), "--listen", lab.pub_addr,
        "--coordinator-db", f"sqlite:///{db}",
        "--lease-ttl", "2", "--settle-window", "0.3", "--start-timeout", "30",
        sys.executable, SCRIPT],
        repo_env(HORDE_TEST_OUT=str(outs["owner"]), HORDE_HOSTNAME="public", **common),
        logs["owner"], cwd=REPO)
    all_logs = list(logs.values())
    printed = str(_wait("the owner's join command", lambda: _join_line(logs["owner"]), 60,
                        all_logs))
    return OwnerRun(outs, logs, stop, db, common, owner, all_logs, shlex.split(printed))


def test_members_behind_nat_train_through_the_relay_and_survive_a_kill(
        lab: NatLab, tmp_path: Path) -> None:
    outs, logs, stop, db, common, owner, all_logs, argv = start_owner(
        lab, tmp_path, ("home1", "home2"))
    _wait("the owner's worker to train", lambda: _records(outs["owner"]), 60, all_logs)

    joiners = {}
    for i, name in enumerate(("home1", "home2")):
        joiners[name] = lab.popen(lab.homes[i], argv, repo_env(
            HORDE_TEST_OUT=str(outs[name]), HORDE_HOSTNAME=name, **common), logs[name],
            cwd=REPO)
    _wait("three members committing, two of them behind NAT", lambda: all(
        len(_commits(outs[n], 3)) >= 4 for n in outs), 150, all_logs)

    # The homes were found unreachable and the generation of three went through the relay.
    for name in ("home1", "home2"):
        assert "does not accept (behind NAT" in logs[name].read_text(errors="replace")
    assert "collectives through the relay at " in logs["owner"].read_text(errors="replace")
    by_step: dict[tuple, set[str]] = {}
    for folder in outs.values():
        for r in _commits(folder, 3):
            by_step.setdefault((r["generation"], r["epoch"], r["batch"]), set()).add(r["params"])
    assert by_step and all(len(p) == 1 for p in by_step.values()), by_step
    assert any(len({r["node"] for f in outs.values() for r in _commits(f, 3)
                    if (r["generation"], r["epoch"], r["batch"]) == step}) == 3
               for step in by_step)

    # A member behind NAT is SIGKILLed: the owner and the other one go on, as two.
    victim = _commits(outs["home2"], 3)[-1]
    os.kill(victim["pid"], signal.SIGKILL)
    survivors = ("owner", "home1")
    _wait("the survivors committing as two", lambda: all(
        len(_commits(outs[n], 2)) >= 4 for n in survivors), 120, all_logs)

    stop.touch()
    for name in ("home1", "owner"):
        proc = joiners.get(name, owner)
        _wait(f"{name} to exit", lambda proc=proc: proc.poll() is not None, 120, all_logs)
    assert (owner.returncode, joiners["home1"].returncode) == (0, 0), "\n".join(
        log.read_text(errors="replace")[-4000:] for log in all_logs)

    done = {n: [r for r in _records(outs[n]) if r["event"] == "done"] for n in survivors}
    assert all(len(d) == 1 for d in done.values()), done
    assert done["owner"][0]["params"] == done["home1"][0]["params"]
    assert done["owner"][0]["size"] == done["home1"][0]["size"] == 2

    credit = _credit(db)
    for name in ("home1", "home2"):
        node = _records(outs[name])[0]["node"]
        assert credit.get(node, 0) > 0, f"no credit for {name} ({node}): {credit}"
