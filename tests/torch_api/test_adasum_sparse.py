"""Adasum (`op=hvd.Adasum`) and `hvd.sparse_allreduce_async` against real worker processes.

One launch of four workers runs scripts/adasum_sparse_worker.py; most checks run on three
groups of them, each its own Gloo group: 4 ranks (the global set), 3 ranks (not a power
of two) and 2 ranks. Each member compares its results with a direct formula; here the
members of a group must also agree with each other bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.torch_api.conftest import Run, launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WORKER = Path(__file__).resolve().parent / "scripts" / "adasum_sparse_worker.py"
GROUPS = {"np4": [0, 1, 2, 3], "np3": [0, 1, 2], "np2": [1, 3]}


@pytest.fixture(scope="module")
def four(etcd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Four workers that ran every check."""
    return launch(etcd_server.url, tmp_path_factory.mktemp("adasum"), 4, "adasum",
                  worker=WORKER)


def values(run: Run, name: str, group: str) -> list[Any]:
    """Check `name` on the members of `group` (each must have passed), in group order."""
    assert run.codes == [0] * run.np, f"exit codes {run.codes}\n{run.output}"
    out = []
    for rank in GROUPS[group]:
        entry = run.results[rank].get(f"{name}[{group}]")
        assert entry is not None, f"rank {rank} did not run {name}[{group}]\n{run.output}"
        assert entry["ok"], f"{name}[{group}] failed on rank {rank}:\n{entry.get('error')}"
        out.append(entry["value"])
    return out


def same_bits(got: list[Any], what: str) -> None:
    for member, value in enumerate(got[1:], start=1):
        assert value == got[0], f"{what}: group rank {member} differs from group rank 0"


@pytest.mark.parametrize("group", GROUPS)
def test_adasum_matches_the_direct_formula(four: Run, group: str) -> None:
    # float64/32/16 and bfloat16, several shapes, zero vectors, norms under the floor
    same_bits(values(four, "adasum_formula", group), "Adasum results")


@pytest.mark.parametrize("group", GROUPS)
def test_adasum_grouped_inplace_async_scaled_and_differentiable(four: Run, group: str) -> None:
    got = values(four, "adasum_variants", group)
    same_bits([v["grouped"] for v in got], "grouped Adasum")
    assert all("floating-point" in v["bad_dtype"] for v in got)


def test_adasum_with_joined_ranks(four: Run) -> None:
    got = values(four, "adasum_join", "np4")
    same_bits([v["joined3"] for v in got[:3]], "Adasum with rank 3 joined")
    same_bits([v["joined0"] for v in got[1:]], "Adasum with rank 0 joined")


@pytest.mark.parametrize("group", GROUPS)
def test_adasum_bit_identical_when_one_rank_rounds_differently(four: Run, group: str) -> None:
    got = values(four, "adasum_bit_identical_with_uneven_rounding", group)
    same_bits([v["result"] for v in got], "Adasum with one rank's dot products skewed")


@pytest.mark.parametrize("group", GROUPS)
def test_adasum_distributed_optimizer(four: Run, group: str) -> None:
    # each member compared itself with N simulated local optimizers and the direct formula
    same_bits([v["params"] for v in values(four, "adasum_optimizer", group)], "parameters")


@pytest.mark.parametrize("group", GROUPS)
def test_sparse_allreduce_async(four: Run, group: str) -> None:
    got = values(four, "sparse_allreduce", group)
    for key in got[0]:
        if key not in ("dense", "op"):
            same_bits([v[key] for v in got], f"sparse allreduce {key}")
    assert all(v["dense"].startswith("ValueError") for v in got)
    assert all(v["op"].startswith("ValueError") for v in got)


@pytest.mark.parametrize("group", GROUPS)
def test_sparse_embedding_through_distributed_optimizer(four: Run, group: str) -> None:
    # each member compared itself with one process training on the concatenated batches
    got = values(four, "sparse_embedding_training", group)
    for as_dense in ("False", "True"):
        same_bits([v[as_dense] for v in got], f"parameters (sparse_as_dense={as_dense})")
