"""The robust aggregation rule (`elastic.codecs.robust`) on its own, and its setting.

The rule's end-to-end effect (real workers, one hostile) is in test_robust_aggregation.py;
here: which contribution it leaves out, on dense and sparse gradients, its determinism,
when it cannot apply, and how the setting is read and handed to joiners.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
import torch

from elastic.codecs.robust import MultiKrum, krum_scores, robust_applies


def honest(count: int, numel: int = 2000, density: float = 1.0, seed: int = 0
           ) -> list[torch.Tensor]:
    """Noisy gradients around one common direction; `density` < 1: each keeps its own
    largest entries only (as top-k does), mostly different coordinates per member."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(numel, generator=gen)
    out = []
    for _ in range(count):
        g = mean + 2.0 * torch.randn(numel, generator=gen)
        if density < 1:
            keep = g.abs().topk(int(density * numel)).indices
            sparse = torch.zeros(numel)
            sparse[keep] = g[keep]
            g = sparse
        out.append(g)
    return out


@pytest.mark.parametrize("density", [1.0, 0.05])
@pytest.mark.parametrize("scale", [-1.0, -4.0, 10.0])
def test_the_poisoned_member_is_left_out(density: float, scale: float) -> None:
    for position in range(4):
        grads = honest(4, density=density, seed=position)
        grads[position] = scale * grads[position]
        kept = MultiKrum(1).keep(grads, [0, 1, 2, 3])
        assert kept == [r for r in range(4) if r != position], (scale, density, position)


def test_suspicion_builds_up_over_rounds_against_a_persistent_attacker() -> None:
    """With gradients so noisy that one round alone often misjudges, the smoothed
    suspicion still leaves the sign-flipper out nearly every round."""
    rule = MultiKrum(1)
    remembering = memoryless = 0
    for round_ in range(60):
        grads = [g + 8.0 * torch.randn(g.numel(), generator=torch.Generator().manual_seed(
            1000 * round_ + i)) for i, g in enumerate(honest(4, seed=100 + round_))]
        grads[2] = -grads[2]
        remembering += 2 not in rule.keep(grads, [0, 1, 2, 3])
        memoryless += 2 not in MultiKrum(1).keep(grads, [0, 1, 2, 3])
    assert max(rule.suspicion, key=rule.suspicion.__getitem__) == 2, rule.suspicion
    assert remembering >= 57 and remembering > memoryless, (remembering, memoryless)


def test_a_minority_cannot_be_told_and_everything_is_kept() -> None:
    assert not robust_applies(2, 1) and robust_applies(3, 1) and not robust_applies(4, 2)
    assert robust_applies(5, 2) and not robust_applies(4, 0)
    grads = honest(2)
    assert MultiKrum(1).keep([grads[0], -4 * grads[1]], [0, 1]) == [0, 1]
    assert MultiKrum(0).keep(honest(4), [0, 1, 2, 3]) == [0, 1, 2, 3]


def test_a_known_attacker_is_left_out_of_rounds_too_small_to_outvote_it() -> None:
    """Staleness rounds of a slow member can hold two contributions: a rank that past
    rounds marked as suspect stays out of them; honest ranks and a lone one stay in."""
    rule = MultiKrum(1)
    for round_ in range(30):
        grads = honest(4, seed=200 + round_)
        grads[3] = -4 * grads[3]
        rule.keep(grads, [0, 1, 2, 3])
    small = honest(2, seed=7)
    assert rule.keep([small[0], -4 * small[1]], [1, 3]) == [0]
    assert rule.keep(small, [0, 1]) == [0, 1]
    assert rule.keep([small[0]], [3]) == [0]  # never every contribution
    assert MultiKrum(1).keep([small[0], -4 * small[1]], [1, 3]) == [0, 1]  # no past: kept


def test_f_two_of_six_leaves_out_both_attackers() -> None:
    grads = honest(6)
    grads[1], grads[4] = -grads[1], 5 * grads[4]
    assert MultiKrum(2).keep(grads, list(range(6))) == [0, 2, 3, 5]


def test_ties_leave_out_the_higher_rank_and_the_choice_is_repeatable() -> None:
    same = [torch.ones(10)] * 4
    assert MultiKrum(1).keep(same, [0, 1, 2, 3]) == [0, 1, 2]
    grads = honest(4, density=0.05)
    assert krum_scores(grads, 1) == krum_scores([g.clone() for g in grads], 1)


def test_a_negative_f_is_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        MultiKrum(-1)


def test_the_setting_is_read_from_the_environment_and_checked() -> None:
    from elastic.settings import WorkerSettings

    assert WorkerSettings.from_env({}).robust_aggregation == 0
    assert WorkerSettings.from_env({"HORDE_ROBUST_AGGREGATION": "1"}).robust_aggregation == 1
    with pytest.raises(ValueError, match="HORDE_ROBUST_AGGREGATION=-1 must be >= 0"):
        WorkerSettings.from_env({"HORDE_ROBUST_AGGREGATION": "-1"})
    with pytest.raises(ValueError, match="HORDE_ROBUST_AGGREGATION='x' must be an integer"):
        WorkerSettings.from_env({"HORDE_ROBUST_AGGREGATION": "x"})


def test_horderun_takes_the_flag_then_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from elastic.launcher.cli import UsageError, build_plan, make_parser

    def plan(*flags: str) -> Any:
        return build_plan(make_parser().parse_args([*flags, "-np", "1", "true"]))

    monkeypatch.delenv("HORDE_ROBUST_AGGREGATION", raising=False)
    assert plan().robust_aggregation == 0
    monkeypatch.setenv("HORDE_ROBUST_AGGREGATION", "2")
    assert plan().robust_aggregation == 2
    assert plan("--robust-aggregation", "1").robust_aggregation == 1
    with pytest.raises(UsageError, match="--robust-aggregation -1 must be >= 0"):
        plan("--robust-aggregation", "-1")
    monkeypatch.setenv("HORDE_ROBUST_AGGREGATION", "some")
    with pytest.raises(UsageError, match="HORDE_ROBUST_AGGREGATION='some' must be an integer"):
        plan()


@pytest.mark.slow
def test_a_joiner_aggregates_as_the_job_does(etcd_server: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Members that aggregate differently would part their parameters: a `--join`ed
    worker gets the job's value, whatever its own environment says."""
    from rendezvous.etcd import EtcdBackend
    from rendezvous.keys import JobKeys
    from rendezvous.settings import DEFAULT_PREFIX
    from tests.harness import horderun, repo_env, unique_job

    backend = EtcdBackend(etcd_server.host, etcd_server.port)
    job = unique_job("robust-join")
    keys = JobKeys(DEFAULT_PREFIX, job)
    config = {"rendezvous": {"HORDE_ROBUST_AGGREGATION": "1"},
              "HORDE_COLLECTIVE_TIMEOUT": "30"}
    try:
        backend.put(keys.config, json.dumps(config).encode())
        result = horderun(
            "--join", "--rendezvous", etcd_server.url, "--job", job, "-np", "1",
            "--coordinator", "none", sys.executable, "-c",
            "import os; print('robust=' + os.environ['HORDE_ROBUST_AGGREGATION'])",
            env=repo_env(HORDE_ROBUST_AGGREGATION="0"), timeout=60)
    finally:
        backend.delete(keys.config)
        backend.close()
    assert "robust=1" in result.stdout + result.stderr, result.stdout + result.stderr
