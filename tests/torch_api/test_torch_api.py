"""The `elastic.torch` API against real worker processes and a real etcd.

Two launches serve the whole module: two workers run every check, three workers run
the checks that need a third rank (process sets) or profit from one. Each test reads
one check's results from every rank (see scripts/api_worker.py) and compares ranks.
"""

from __future__ import annotations

import pytest

from tests.torch_api.conftest import Run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SIMPLE = ["allreduce_ops", "allreduce_inplace_and_async", "grouped_allreduce", "allgather",
          "broadcast", "alltoall", "reducescatter", "autograd", "sync_batch_norm"]


def same_on_every_rank(values: list, what: str) -> None:
    for rank, value in enumerate(values[1:], start=1):
        assert value == values[0], f"{what}: rank {rank} differs from rank 0"


@pytest.mark.parametrize("name", SIMPLE)
def test_collectives_two_ranks(two: Run, name: str) -> None:
    two.check(name)


@pytest.mark.parametrize("name", ["allreduce_ops", "allgather", "alltoall", "reducescatter",
                                  "autograd", "sync_batch_norm"])
def test_collectives_three_ranks(three: Run, name: str) -> None:
    three.check(name)


def test_calls_before_init_raise_value_error(two: Run) -> None:
    for value in two.check("before_init"):
        assert all(msg.startswith("NotInitializedError") for msg in value.values()), value


def test_barrier_waits_for_every_rank(two: Run) -> None:
    waited = [v["waited"] for v in two.check("barrier")]
    assert waited[1] > 0.3, waited


@pytest.mark.parametrize("np", [2, 3])
def test_join_with_uneven_batches(two: Run, three: Run, np: int) -> None:
    values = (two if np == 2 else three).check("join_uneven")
    assert [v["last"] for v in values] == [np - 1] * np
    same_on_every_rank([v["sums"][:2] for v in values], "allreduce results before any join")


@pytest.mark.parametrize("np", [2, 3])
def test_distributed_optimizer_with_join_and_uneven_steps(two: Run, three: Run, np: int
                                                         ) -> None:
    values = (two if np == 2 else three).check("optimizer_join_uneven")
    same_on_every_rank([v["params"] for v in values], "parameters after join")
    assert all(v["stats"]["direct_steps"] > 0 for v in values), values


def test_distributed_optimizer_falls_back_when_the_model_changes_dtype(two: Run) -> None:
    values = two.check("optimizer_dtype_change_falls_back")
    same_on_every_rank([v["grad"] for v in values], "bf16 gradients after the fallback")


def test_broadcast_parameters(two: Run) -> None:
    values = two.check("broadcast_parameters")
    same_on_every_rank([v["state"] for v in values], "model state after broadcast")
    same_on_every_rank([v["other"] for v in values], "named parameters after broadcast")


def test_broadcast_optimizer_state(two: Run) -> None:
    values = two.check("broadcast_optimizer_state")
    same_on_every_rank([v["adam"] for v in values], "Adam state after broadcast and a step")
    same_on_every_rank([v["params"] for v in values], "parameters after a step")


@pytest.mark.parametrize("np", [2, 3])
def test_broadcast_and_allgather_object(two: Run, three: Run, np: int) -> None:
    values = (two if np == 2 else three).check("objects")
    assert all(v["gathered"] == list(range(np)) for v in values)


@pytest.mark.parametrize("np", [2, 3])
def test_distributed_optimizer_matches_one_process(two: Run, three: Run, np: int) -> None:
    # each worker already compared itself with a one-process run on the global batches;
    # here the ranks must also agree with each other bit for bit
    values = (two if np == 2 else three).check("distributed_optimizer_equivalence")
    for variant in values[0]:
        same_on_every_rank([v[variant] for v in values], f"parameters ({variant})")


def test_distributed_optimizer_api(two: Run) -> None:
    values = two.check("distributed_optimizer_api")
    same_on_every_rank([v["params_after_unused"] for v in values],
                       "parameters after a step with a parameter unused on one rank")
    for v in values:
        assert "duplicates: same" in v["dup"] and "were not named" in v["missing"]


@pytest.mark.parametrize("np", [2, 3])
def test_sync_batch_norm_under_distributed_optimizer(two: Run, three: Run, np: int) -> None:
    values = (two if np == 2 else three).check("sync_batch_norm_training")
    same_on_every_rank([v["params"] for v in values], "parameters")


def test_misuse_fails_promptly_on_every_rank(two: Run) -> None:
    values = two.check("misuse_errors")
    for v in values:
        assert v["shape"].startswith("CollectiveMismatchError"), v["shape"]
        assert v["dtype"].startswith("CollectiveMismatchError"), v["dtype"]
        assert v["root"].startswith("CollectiveMismatchError"), v["root"]
        assert v["kind"].startswith("CollectiveMismatchError"), v["kind"]
        assert v["root_range"].startswith("ValueError"), v["root_range"]
        assert v["duplicate"].startswith("ValueError") and "same name" in v["duplicate"]
        assert v["adasum"].startswith("ValueError") and "Adasum" in v["adasum"]


def test_process_sets(three: Run) -> None:
    values = three.check("process_sets")
    assert [v["member"] for v in values] == [True, True, False]

