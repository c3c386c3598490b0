"""A sampler that shards a dataset over a changing world without repeating samples."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sized
from typing import Any

import torch.utils.data

from elastic.torch.basics import rank, size


class ElasticSampler(torch.utils.data.Sampler):
    """Shards the epoch's permutation over the current ranks, skipping what was processed.

    Call `record_batch(batch_idx, batch_size)` after each step and commit the state
    that holds the sampler; after a reset the rest of the epoch is re-sharded over the
    new world, so no committed sample is seen twice and none is skipped.
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int = 0) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.processed_num = 0
        self.num_replicas = 1
        self.rank = 0
        self.remaining_indices: list[int] = []
        self.num_samples = 0
        self.total_size = 0
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` (a new permutation) with nothing processed yet."""
        self.epoch = epoch
        self.processed_num = 0
        self.reset()

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """Count one step of `batch_size` samples per rank as processed."""
        self.processed_num += batch_size * self.num_replicas

    def record_indices(self, indices: list[int]) -> None:
        """Count the given number of samples (all ranks together) as processed."""
        self.processed_num += len(indices)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "processed_num": self.processed_num}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.processed_num = int(state["processed_num"])
        self.reset()

    def reset(self) -> None:
        """Re-shard what is left of the epoch over the current world."""
        try:
            self.num_replicas, self.rank = size(), rank()
        except ValueError:
            self.num_replicas, self.rank = 1, 0
        indices = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(indices)
        self.remaining_indices = indices[self.processed_num:]
        self.num_samples = math.ceil(len(self.remaining_indices) / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        indices = list(self.remaining_indices)
        if indices:
            padding = self.total_size - len(indices)
            indices += (indices * math.ceil(padding / len(indices)))[:padding] if padding else []
        return iter(indices[self.rank:self.total_size:self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
