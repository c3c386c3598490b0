"""scatter_add_payloads: deterministic rank-order sums, weights; the byte formulas."""

from __future__ import annotations

import pytest
import torch

from elastic.codecs import (
    SparsePayload,
    TopKCompressor,
    allgather_bytes,
    allreduce_bytes,
    break_even_density,
    decompress,
    scatter_add_payloads,
)
from tests.sparse.conftest import DEVICES, make_buffer

N = 50_000


def rank_payloads(world: int, device: str = "cpu") -> list[SparsePayload]:
    """One payload per rank: overlapping top-k sets, mixed fp16/fp32, one dense."""
    out = []
    for rank in range(world):
        g = make_buffer("heavy" if rank % 2 else "normal", N, seed=rank, device=device)
        g[:100] += 50.0  # every rank sends these: the same entries get many adds
        comp = TopKCompressor(density=0.02, fp16_values=rank % 3 == 0)
        out.append(comp.compress("w", g, 0, dense=rank == world - 1))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_sum_is_bit_identical_across_runs_and_thread_counts(device: str) -> None:
    payloads = rank_payloads(8, device)
    weights = [1.0 / (1 + r % 3) for r in range(8)]
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, max(2, threads), 1):
            torch.set_num_threads(n_threads)
            out = torch.full((N,), 7.0, device=device)
            results.append(scatter_add_payloads(payloads, weights, out).clone())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(results[0], other)
    ref = sum(w * decompress(p).double() for p, w in zip(payloads, weights))
    assert torch.allclose(results[0].double(), ref, rtol=1e-6, atol=1e-4)


def test_rank_order_and_receiver_side_bytes() -> None:
    # Each rank decodes the others' bytes: all end with the same bits.
    payloads = rank_payloads(4)
    wire = [SparsePayload.from_bytes(p.to_bytes()) for p in payloads]
    a = scatter_add_payloads(payloads, None, torch.empty(N))
    b = scatter_add_payloads(wire, None, torch.empty(N))
    assert torch.equal(a, b)


def test_accumulate_weights_and_errors() -> None:
    payloads = rank_payloads(3)
    out = scatter_add_payloads(payloads, [1.0, 0.0, 2.0], torch.zeros(N))
    expected = decompress(payloads[0]) + 2.0 * decompress(payloads[2])
    assert torch.allclose(out, expected)
    again = scatter_add_payloads(payloads[:1], None, out.clone(), accumulate=True)
    assert torch.allclose(again, expected + decompress(payloads[0]))
    with pytest.raises(ValueError, match="weights"):
        scatter_add_payloads(payloads, [1.0], torch.zeros(N))
    with pytest.raises(ValueError, match="entries"):
        scatter_add_payloads(payloads, None, torch.zeros(N + 1))
    assert torch.equal(scatter_add_payloads([], None, torch.ones(4)), torch.zeros(4))


@pytest.mark.parametrize("world", [2, 4, 16])
@pytest.mark.parametrize("value_bytes", [2, 4])
def test_break_even_is_where_the_byte_counts_cross(world: int, value_bytes: int) -> None:
    d = 1_000_000
    rho = break_even_density(world, value_bytes, dense_bytes=4)
    k = rho * d
    sparse = allgather_bytes([k] * world, 0, value_bytes)
    assert sparse == pytest.approx(allreduce_bytes(d, world, 4))
    assert allgather_bytes([0.5 * k] * world, 0, value_bytes) < allreduce_bytes(d, world)
