"""Robust aggregation through the real path: `horderun -np 4` of real worker processes
(a real embedded etcd, real Gloo groups) training scikit-learn's digits, rank 3 of which
poisons its gradient at every step (tests/security/scripts/gradient_worker.py).

Without `--robust-aggregation` the poisoned gradient is averaged in: a sign flip costs
points, -4x destroys the model (the job may then stop: the model non-finite everywhere, or
members struck out as their norms grew with the divergence). With `--robust-aggregation 1`
the job ends within 1 point of a clean run without the option (the mean over two data
orders, as tests/convergence does, since one run of digits varies by about a point),
members' parameters identical, and the hostile rank is the one left out.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from tests.harness import horderun, repo_env

SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "gradient_worker.py")
SEEDS = ("100", "200")
HOSTILE = 3
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


#: How an unprotected job that the attack wrecked may stop instead of finishing: the
#: model went non-finite on every member, or the norm check struck members out while the
#: model diverged (an honest member's growing norm looks like an outlier then).
WRECKED = ("every gradient of the last", "too many rejected contributions")


def run_job(out: Path, robust: int, may_be_wrecked: bool = False,
            **env: str) -> list[dict] | None:
    """`horderun -np 4 [--robust-aggregation F]` of the worker; each rank's results (None:
    with `may_be_wrecked`, the job stopped, saying it was wrecked)."""
    out.mkdir(parents=True)
    flags = ["--robust-aggregation", str(robust)] if robust else []
    result = horderun("-np", "4", "--log-level", "WARNING", "--coordinator", "none", *flags,
                      sys.executable, SCRIPT, env=repo_env(OUT=str(out), **env), timeout=240)
    output = result.stdout + result.stderr
    if may_be_wrecked and result.returncode != 0:
        assert any(why in output for why in WRECKED), output
        return None
    assert result.returncode == 0, output
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    for run in ranks[0]["runs"]:
        assert len({r["runs"][run]["params"] for r in ranks}) == 1, \
            f"{run}: members' parameters differ"
    return ranks


def check(tmp_path: Path, attack: str, seeds_without: tuple[str, ...], **env: str) -> None:
    """Per data order: a job without the option (a clean run, and the attack for the
    orders in `seeds_without`: one is enough to show the attack matters) and one with it
    (the attack); compare the means."""
    clean, unprotected, protected = [], [], []
    wrecked = 0  # unprotected jobs the attack stopped (see WRECKED)
    for seed in SEEDS:
        plain = run_job(tmp_path / f"plain{seed}", 0, RUNS="clean", DATA_SEED=seed, **env)
        clean.append(plain[0]["runs"]["clean"]["accuracy"])  # type: ignore[index]
        if seed in seeds_without:
            attacked = run_job(tmp_path / f"attacked{seed}", 0, may_be_wrecked=True,
                               RUNS="attack", DATA_SEED=seed, ATTACK_RANK=str(HOSTILE),
                               ATTACK=attack, **env)
            if attacked is None:
                wrecked += 1
            else:
                unprotected.append(attacked[0]["runs"]["attack"]["accuracy"])
        robust = run_job(tmp_path / f"robust{seed}", 1, RUNS="attack", DATA_SEED=seed,
                         ATTACK_RANK=str(HOSTILE), ATTACK=attack,
                         **env)[0]["runs"]["attack"]  # type: ignore[index]
        protected.append(robust["accuracy"])
        stats = robust["stats"]
        # One contribution a round is left out, and nearly always the hostile one.
        assert stats["robust_dropped"] >= 0.95 * stats["rounds"], stats
        assert stats["robust_dropped_ranks"].get(str(HOSTILE), 0) \
            >= 0.9 * stats["robust_dropped"], stats
    summary = (f"clean {clean}, attacked {unprotected} (and {wrecked} stopped), attacked "
               f"with the option {protected}")
    # The attack matters: without the option it costs well over the 1-point margin, or
    # stops the job ...
    assert wrecked or statistics.mean(unprotected) < statistics.mean(clean) - 3, summary
    # ... and with it the job ends within 1 point of the clean runs.
    assert statistics.mean(protected) >= statistics.mean(clean) - 1.0, summary


def test_a_sign_flipping_member_is_outvoted_in_synchronous_topk(tmp_path: Path) -> None:
    check(tmp_path, "scale:-1@0-", SEEDS[:1], STALENESS="0", TOPK="0.05", STEPS="300")


def test_a_scaling_member_is_outvoted_in_staleness_rounds(tmp_path: Path) -> None:
    check(tmp_path, "scale:-4@0-", SEEDS[:1], STALENESS="1", TOPK="0", STEPS="500")
