"""Shared helpers for the sparse tests: buffers of the shapes gradients take."""

from __future__ import annotations

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.gpu])]


def make_buffer(kind: str, n: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """A flat buffer: normal, heavy-tailed, layered scales, mostly zeros, or constant."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(n, generator=gen)
    elif kind == "heavy":
        # Student-t with 1.5 degrees of freedom: infinite variance, power-law tails.
        z = torch.randn(n, generator=gen)
        chi = torch.distributions.Gamma(0.75, 0.5).sample((n,))
        x = z / torch.sqrt(chi / 1.5)
    elif kind == "layers":
        # Fused layers whose gradient scales differ by 1e4.
        parts = torch.randn(n, generator=gen).chunk(5)
        x = torch.cat([p * 10.0 ** (i - 2) for i, p in enumerate(parts)])
    elif kind == "sparse":
        x = torch.randn(n, generator=gen)
        x[torch.rand(n, generator=gen) > 0.002] = 0.0
    elif kind == "constant":
        x = torch.full((n,), 0.5)
    else:
        raise ValueError(kind)
    return x.to(device)
