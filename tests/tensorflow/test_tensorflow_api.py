"""`elastic.tensorflow` under `horderun -np 2` with a real etcd: one launch runs every
check (scripts/tf_worker.py) and each test compares what the two ranks recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install -e "
                    "'.[tensorflow]')")

from tests.harness import run_workers_json  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WORKER = str(Path(__file__).resolve().parent / "scripts" / "tf_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_workers_json(tmp_path_factory.mktemp("tf2"), 2, WORKER)


def values(ranks: list[dict[str, Any]], name: str) -> list[Any]:
    out = []
    for rank, result in enumerate(ranks):
        entry = result.get(name)
        assert entry is not None, f"rank {rank} did not run {name}"
        assert entry["ok"], f"{name} failed on rank {rank}:\n{entry.get('error')}"
        out.append(entry["value"])
    return out


def test_every_collective_matches_the_pytorch_frontend(ranks: list[dict]) -> None:
    compared = values(ranks, "collectives_match_torch")
    assert compared[0] == compared[1] >= 80


def test_objects_and_variables_are_broadcast(ranks: list[dict]) -> None:
    objs = values(ranks, "objects")
    assert all(o["bcast"] == {"from": 1, "list": [1, 2]} for o in objs)
    assert all(o["gathered"] == [{"rank": 0}, {"rank": 1}] for o in objs)
    var0, var1 = values(ranks, "broadcast_variables")
    assert var0 == var1


def test_gradients_are_horovods(ranks: list[dict]) -> None:
    g0, g1 = (dict((k, np.array(v)) for k, v in r.items()) for r in values(ranks, "gradients"))
    # loss_r = sum_i i * y_r[i, :]; row weights 0, 1, 2 (3 rows per rank)
    rows = np.array([0.0, 1.0, 2.0])[:, None] * np.ones((3, 2))
    for g in (g0, g1):
        assert np.allclose(g["allreduce_sum"], rows * 2)  # sum of both ranks' upstream
        assert np.allclose(g["allreduce_avg"], rows)  # averaged upstream, averaged again
    gathered = np.arange(6.0)[:, None] * np.ones((6, 2))  # weights of the gathered rows
    assert np.allclose(g0["allgather"], gathered[:3]) and np.allclose(g1["allgather"],
                                                                      gathered[3:])
    assert np.allclose(g0["broadcast"], rows) and np.allclose(g1["broadcast"], 0)
    for g in (g0, g1):
        assert np.isfinite(g["alltoall"]).all()
        # reducescatter: the gathered upstream (times the set size for Sum)
        assert np.allclose(g["reducescatter_avg"] * 2, g["reducescatter_sum"])


def test_indexed_slices_gradients(ranks: list[dict]) -> None:
    v0, v1 = values(ranks, "indexed_slices")
    assert v0["dense"] == v1["dense"]
    assert v0["sum_indices"] == v1["sum_indices"] == [0, 1]


def test_misuse_raises_horovods_error_kinds(ranks: list[dict]) -> None:
    for v in values(ranks, "misuse_errors"):
        for key in ("shape", "dtype", "root_mismatch", "variables_differ"):
            assert v[key].startswith("FailedPreconditionError"), (key, v[key])
        # inside tf.function TensorFlow reports any py_function failure as UnknownError
        assert v["shape_graph"].startswith("UnknownError"), v["shape_graph"]
        assert "FailedPreconditionError: Mismatched allreduce tensor shapes" in v["shape_graph"]
        assert v["root_range"].startswith("InvalidArgumentError"), v["root_range"]
        assert v["duplicate_set"].startswith("ValueError"), v["duplicate_set"]
        assert v["after"] == [2.0]  # the ranks are still in step after every error


def test_gradient_tape_matches_one_process(ranks: list[dict]) -> None:
    t0, t1 = values(ranks, "gradient_tape_training")
    for variant in t0:
        assert t0[variant] == t1[variant], f"ranks differ ({variant})"


def test_keras_fit_matches_one_process_and_ranks_agree(ranks: list[dict]) -> None:
    f0, f1 = values(ranks, "keras_fit")
    assert f0["weights"] == f1["weights"]
    assert f0["loss"] == f1["loss"]  # MetricAverageCallback
    assert f0["lr"] == pytest.approx([0.05, 0.05])  # warmed up to the full rate
    p0, p1 = values(ranks, "keras_fit_backward_passes")
    assert p0 == p1 and p0["updates"] == 2 * 64 // (2 * 8)  # 2 epochs of 8 batches, every 2nd
    s0, s1 = values(ranks, "keras_fit_staleness")
    assert s0 == s1
