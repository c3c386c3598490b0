"""Who evicts a node whose contributions were refused too often: rank 0, or rank 1 when the
node is rank 0's own; a node never blacklists itself (the worker's real `_blacklist` on
the in-memory rendezvous backend; the rounds' side is in test_gradients.py), and the
setting that stops a job whose gradients stay non-finite."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from elastic.core.worker import WorkerContext
from rendezvous.keys import JobKeys
from rendezvous.memory import MemoryBackend

MEMBERS = ["n0", "n1", "n2"]


def blacklisted_by(rank: int, node: str) -> list[str]:
    """The nodes the blacklist holds after rank `rank` asked to evict `node`."""
    backend, keys = MemoryBackend(), JobKeys("horde", "job")
    worker = WorkerContext.__new__(WorkerContext)
    worker.runtime = SimpleNamespace(rank=rank, node_id=MEMBERS[rank], members=MEMBERS)
    worker.agent = SimpleNamespace(backend=backend, keys=keys)
    worker.rdzv = SimpleNamespace(blacklist_cooldown=None)
    worker._blacklist(node, "too many rejected contributions")
    return [n for n in MEMBERS if backend.get(keys.blacklisted(n)) is not None]


@pytest.mark.parametrize(("node", "acting"), [("n2", 0), ("n1", 0), ("n0", 1)])
def test_exactly_one_rank_evicts_and_never_its_own_node(node: str, acting: int) -> None:
    outcomes = {rank: blacklisted_by(rank, node) for rank in range(3)}
    assert outcomes == {rank: [node] if rank == acting else [] for rank in range(3)}


def test_the_nonfinite_limit_is_read_from_the_environment_and_checked() -> None:
    from elastic.settings import WorkerSettings

    assert WorkerSettings.from_env({}).max_nonfinite_steps == 100
    assert WorkerSettings.from_env({"HORDE_MAX_NONFINITE_STEPS": "0"}).max_nonfinite_steps == 0
    with pytest.raises(ValueError, match="HORDE_MAX_NONFINITE_STEPS=-1 must be >= 0"):
        WorkerSettings.from_env({"HORDE_MAX_NONFINITE_STEPS": "-1"})
    with pytest.raises(ValueError, match="HORDE_MAX_NONFINITE_STEPS='many' must be an integer"):
        WorkerSettings.from_env({"HORDE_MAX_NONFINITE_STEPS": "many"})
