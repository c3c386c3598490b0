"""Sparse aggregation: all ranks' payloads summed into one dense buffer, deterministically.

Payloads are added one after another in the order given (rank order): each payload's
indices are distinct, so one `index_add_` never adds twice into the same entry and its
result does not depend on thread or atomic scheduling. Hence the sum is bit-identical on
every rank that adds the same payloads in the same order on the same kind of device
(CPU, or CUDA with atomics: one add per entry per call). Memory: the dense output only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from elastic.codecs.registry import add_into
from elastic.codecs.topk import break_even_density
from elastic.codecs.wire import SparsePayload

__all__ = ["scatter_add_payloads", "break_even_density", "allreduce_bytes", "allgather_bytes"]


def scatter_add_payloads(
    payloads: Sequence[SparsePayload],
    weights: Sequence[float] | None,
    out: torch.Tensor,
    *,
    accumulate: bool = False,
) -> torch.Tensor:
    """out = sum_r weights[r] * decoded(payloads[r]), added in list order; returns out.

    `weights=None` means all 1. `accumulate=True` adds onto what `out` holds instead of
    zeroing it first. Payloads from untrusted peers should have passed `validate()`
    (`SparsePayload.from_bytes` does it by default).
    """
    if weights is not None and len(weights) != len(payloads):
        raise ValueError(
            f"got {len(weights)} weights for {len(payloads)} payloads; pass one per payload")
    if out.dim() != 1 or not out.dtype.is_floating_point:
        raise ValueError(
            "out must be a flat floating-point buffer, got "
            f"{out.dtype} of shape {tuple(out.shape)}")
    for rank, payload in enumerate(payloads):
        if payload.numel != out.numel():
            raise ValueError(
                f"payload {rank} is for a buffer of {payload.numel} entries, out has "
                f"{out.numel()}")
    if not accumulate:
        out.zero_()
    for rank, payload in enumerate(payloads):
        weight = 1.0 if weights is None else float(weights[rank])
        if weight != 0.0 and payload.count:
            add_into(payload, out, weight)
    return out


def allreduce_bytes(numel: int, world_size: int, dense_bytes: int = 4) -> float:
    """Bytes a rank sends in a ring allreduce of `numel` entries: 2 (N-1)/N * d * b."""
    return 2.0 * (world_size - 1) / world_size * numel * dense_bytes


def allgather_bytes(counts: Sequence[int], rank: int, value_bytes: int,
                    index_bytes: int = 4) -> float:
    """Bytes a rank receives in an allgather of (index, value) pairs: the others' pairs."""
    pair = index_bytes + value_bytes
    return float(sum(c for r, c in enumerate(counts) if r != rank) * pair)
