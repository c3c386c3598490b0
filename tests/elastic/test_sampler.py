"""ElasticSampler re-shards the rest of an epoch over a new world without repeats or gaps."""

from __future__ import annotations

import pytest

from elastic.torch.elastic import sampler as sampler_module
from elastic.torch.elastic.sampler import ElasticSampler


def shards(monkeypatch: pytest.MonkeyPatch, sampler: ElasticSampler, world: int) -> list[list[int]]:
    out = []
    for r in range(world):
        monkeypatch.setattr(sampler_module, "size", lambda w=world: w)
        monkeypatch.setattr(sampler_module, "rank", lambda r=r: r)
        sampler.reset()
        out.append(list(iter(sampler)))
    return out


def test_rest_of_epoch_is_resharded_after_a_world_change(monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = list(range(100))
    sampler = ElasticSampler(dataset, shuffle=True, seed=5)
    first = shards(monkeypatch, sampler, 2)
    assert sorted(first[0] + first[1]) == list(range(100))
    # Two steps of 10 samples per rank were committed on a world of 2.
    for step in range(2):
        sampler.record_batch(step, 10)
    seen = set(first[0][:20] + first[1][:20])
    state = sampler.state_dict()
    restored = ElasticSampler(dataset, shuffle=True, seed=5)
    restored.load_state_dict(state)
    after = shards(monkeypatch, restored, 3)
    rest = [i for shard in after for i in shard]
    assert set(rest) == set(range(100)) - seen, "a committed sample is seen again or one is lost"
    assert max(len(s) for s in after) - min(len(s) for s in after) <= 1


def test_new_epoch_is_a_new_permutation() -> None:
    sampler = ElasticSampler(list(range(50)), shuffle=True, seed=0)
    first = list(iter(sampler))
    sampler.set_epoch(1)
    second = list(iter(sampler))
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second
