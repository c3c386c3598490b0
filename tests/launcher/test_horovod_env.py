"""Horovod's environment variables: honoured where Horde has the setting (a HORDE_* twin
wins), named in one warning at init where it has not."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from elastic.launcher.cli import build_plan, make_parser
from elastic.settings import WorkerSettings, horovod_notes
from rendezvous.settings import RendezvousSettings
from tests.harness import horderun, repo_env

SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "horovod_env.py")


@pytest.mark.timeout(150)
def test_horovod_variables_reach_the_workers_under_horderun() -> None:
    result = horderun("-np", "2", "--coordinator", "none", sys.executable, SCRIPT,
                      env=repo_env(HOROVOD_GLOO_TIMEOUT_SECONDS="3",
                                   HOROVOD_FUSION_THRESHOLD="20000", HOROVOD_CYCLE_TIME="5",
                                   HOROVOD_TIMELINE="/tmp/timeline.json"),
                      timeout=120)
    assert result.returncode == 0, result.stderr
    # 4 tensors of 16 KB: one 25 MB bucket by default, two under a 20 000-byte threshold
    assert result.stdout.count("buckets=2") == 2, result.stdout
    # the timeout came from HOROVOD_GLOO_TIMEOUT_SECONDS, after the stall check (1.5 s)
    waited = re.search(r"\[0\]<stdout>:timed out after ([\d.]+) s: a collective failed after "
                       r"stalling for \d+ s \(the stall warnings above .*3000ms", result.stdout)
    assert waited and float(waited.group(1)) < 20, result.stdout + result.stderr
    ignored = ("have no effect in Horde and are ignored: HOROVOD_CYCLE_TIME, "
               "HOROVOD_TIMELINE")
    assert result.stderr.count(ignored) == 2, result.stderr  # once per worker


def plan(*flags: str):  # type: ignore[no-untyped-def]
    return build_plan(make_parser().parse_args([*flags, sys.executable, SCRIPT]))


def test_the_launcher_resolves_flag_then_horde_then_horovod(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOROVOD_GLOO_TIMEOUT_SECONDS", "7")
    monkeypatch.setenv("HOROVOD_LOG_LEVEL", "warning")
    monkeypatch.setenv("HOROVOD_ELASTIC_TIMEOUT", "11")
    resolved = plan("-np", "2")
    assert resolved.collective_timeout == 7.0 and resolved.log_level == "WARNING"
    assert resolved.rdzv.elastic_timeout == 11.0
    monkeypatch.setenv("HORDE_COLLECTIVE_TIMEOUT", "8")
    monkeypatch.setenv("HORDE_ELASTIC_TIMEOUT", "12")
    resolved = plan("-np", "2")
    assert resolved.collective_timeout == 8.0 and resolved.rdzv.elastic_timeout == 12.0
    resolved = plan("-np", "2", "--collective-timeout", "9", "--elastic-timeout", "13",
                    "--log-level", "ERROR")
    assert resolved.collective_timeout == 9.0 and resolved.rdzv.elastic_timeout == 13.0
    assert resolved.log_level == "ERROR"
    monkeypatch.setenv("HOROVOD_LOG_LEVEL", "chatty")
    with pytest.raises(ValueError, match="log level 'CHATTY'"):
        plan("-np", "2")
    monkeypatch.delenv("HORDE_COLLECTIVE_TIMEOUT")
    monkeypatch.setenv("HOROVOD_LOG_LEVEL", "debug")
    monkeypatch.setenv("HOROVOD_GLOO_TIMEOUT_SECONDS", "soon")
    with pytest.raises(ValueError, match="HOROVOD_GLOO_TIMEOUT_SECONDS='soon'"):
        plan("-np", "2")


def test_a_worker_reads_horovod_variables_and_horde_twins_win() -> None:
    env = {"HOROVOD_GLOO_TIMEOUT_SECONDS": "5", "HOROVOD_LOG_LEVEL": "TRACE",
           "HOROVOD_FUSION_THRESHOLD": "0", "HOROVOD_START_TIMEOUT": "44"}
    settings = WorkerSettings.from_env(env)
    assert settings.collective_timeout == 5.0 and settings.log_level == "DEBUG"
    assert settings.fusion_threshold == 0
    assert RendezvousSettings.from_env(env).start_timeout == 44.0
    twins = {**env, "HORDE_COLLECTIVE_TIMEOUT": "6", "HORDE_LOG_LEVEL": "INFO",
             "HORDE_START_TIMEOUT": "45"}
    assert WorkerSettings.from_env(twins).collective_timeout == 6.0
    assert WorkerSettings.from_env(twins).log_level == "INFO"
    assert RendezvousSettings.from_env(twins).start_timeout == 45.0
    with pytest.raises(ValueError, match="HOROVOD_FUSION_THRESHOLD=-1 must be >= 0"):
        WorkerSettings.from_env({"HOROVOD_FUSION_THRESHOLD": "-1"})
    with pytest.raises(ValueError, match="HOROVOD_GLOO_TIMEOUT_SECONDS='x'"):
        WorkerSettings.from_env({"HOROVOD_GLOO_TIMEOUT_SECONDS": "x"})


def test_only_variables_that_are_set_and_ignored_are_named() -> None:
    settings = WorkerSettings.from_env({})
    assert horovod_notes(settings, {"HOROVOD_CONTROLLER": "gloo", "HOROVOD_FUSION_THRESHOLD":
                                    "1", "HOROVOD_HIERARCHICAL_ALLREDUCE": ""}) == []
    notes = horovod_notes(settings, {"HOROVOD_CPU_OPERATIONS": "mpi",
                                     "HOROVOD_HIERARCHICAL_ALLREDUCE": "1"})
    assert notes == ["these Horovod environment variables have no effect in Horde and are "
                     "ignored: HOROVOD_HIERARCHICAL_ALLREDUCE, HOROVOD_CPU_OPERATIONS (see "
                     "docs/migrating-from-horovod.md)"]
