"""Adasum, Horovod's adaptive summation, as pure functions over the ranks' tensors.

For two vectors, `Adasum(a, b) = (1 - a.b / (2|a|^2)) a + (1 - a.b / (2|b|^2)) b`: the
sum when they are orthogonal, the average when they are parallel. A side whose squared
norm is below `NORM_FLOOR` keeps the coefficient 1, as in Horovod, so zeros are neutral.
Over many ranks it is applied along a binary tree in rank order, tensor by tensor (the
dot products are per tensor, never over a fused buffer): ranks (0, 1), (2, 3), ... first,
then those results pairwise, and so on. With 2^k ranks this is exactly Horovod's order;
otherwise an odd one out at some level moves up unchanged and meets a combined result
at a later level (3 ranks: `Adasum(Adasum(g0, g1), g2)`).

Bit-identical on every rank, whatever its CPU or GPU: the dot products and norms
(reductions, whose rounding depends on the kernel) are computed by one rank only, which
hands the coefficients out; every rank then applies them with element-wise operations in
float64 (multiply, add, round to the tensor's dtype), which round alike everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NORM_FLOOR = 1e-8
"""Horovod's threshold on a squared norm below which a side is not scaled."""


def tree_steps(size: int) -> list[tuple[int, int]]:
    """The pairs `(left, right)` that are combined, in order; the result lands in `left`."""
    if size < 1:
        raise ValueError(f"Adasum needs at least one rank, got size={size}")
    nodes = list(range(size))
    steps: list[tuple[int, int]] = []
    while len(nodes) > 1:
        pairs = [(nodes[i], nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]
        steps.extend(pairs)
        nodes = [left for left, _ in pairs] + ([nodes[-1]] if len(nodes) % 2 else [])
    return steps


CHUNK = 1 << 15
"""Elements per pass on the CPU: a chunk's float64 temporaries stay in cache (whole
float64 copies of a large tensor cost more than the arithmetic), and PyTorch runs
operations this small on the calling thread (no thread-pool hand-off per chunk)."""


def _step(t: torch.Tensor) -> int:
    return CHUNK if t.device.type == "cpu" else max(1, t.numel())


def pair_coefficients(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Adasum's two scale factors for `a` and `b`, from dot products in float64."""
    a, b = a.reshape(-1), b.reshape(-1)
    sums = torch.zeros(3, dtype=torch.float64, device=a.device)
    step = _step(a)
    for lo in range(0, a.numel(), step):
        a64 = a[lo:lo + step].to(torch.float64)
        b64 = b[lo:lo + step].to(torch.float64)
        sums[0] += a64.mul(b64).sum()  # not torch.dot: BLAS threads stall on a busy host
        sums[1] += a64.mul(a64).sum()
        sums[2] += b64.mul(b64).sum()
    dot, a_sq, b_sq = sums.tolist()
    a_coeff = 1.0 - dot / a_sq * 0.5 if a_sq >= NORM_FLOOR else 1.0
    b_coeff = 1.0 - dot / b_sq * 0.5 if b_sq >= NORM_FLOOR else 1.0
    return a_coeff, b_coeff


def combine_(a: torch.Tensor, b: torch.Tensor, a_coeff: float, b_coeff: float) -> None:
    """`a = a_coeff * a + b_coeff * b` for flat `a` and `b`, in float64, rounded once to
    `a`'s dtype.

    Separate multiply and add kernels, so no fused multiply-add rounds differently on
    another machine; chunked alike everywhere (the result does not depend on it).
    """
    step = _step(a)
    for lo in range(0, a.numel(), step):
        part = a[lo:lo + step]
        scaled = torch.mul(part.to(torch.float64), a_coeff)
        scaled.add_(torch.mul(b[lo:lo + step].to(torch.float64), b_coeff))
        part.copy_(scaled)


def reduce_parts(parts: Sequence[torch.Tensor], counts: Sequence[int],
                 coefficients: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Adasum of the ranks' flat buffers `parts` (rank order), tensor by tensor.

    `counts` are the sizes of the tensors laid end to end in each buffer. The buffers
    are combined in place. With `coefficients=None` they are computed (one rank does
    this); otherwise the given ones, of shape `(len(tree_steps), len(counts), 2)`, are
    applied. Returns the result (a view of `parts[0]`) and the coefficients.
    """
    steps = tree_steps(len(parts))
    if coefficients is not None and tuple(coefficients.shape) != (len(steps), len(counts), 2):
        raise ValueError(f"Adasum coefficients of shape {tuple(coefficients.shape)} do not fit "
                         f"{len(parts)} ranks and {len(counts)} tensors")
    given = coefficients.tolist() if coefficients is not None else None
    used: list[list[tuple[float, float]]] = []
    bounds = []
    offset = 0
    for count in counts:
        bounds.append((offset, offset + count))
        offset += count
    for s, (left, right) in enumerate(steps):
        used.append([])
        for k, (lo, hi) in enumerate(bounds):
            a, b = parts[left][lo:hi], parts[right][lo:hi]
            a_coeff, b_coeff = given[s][k] if given is not None else pair_coefficients(a, b)
            used[-1].append((a_coeff, b_coeff))
            combine_(a, b, a_coeff, b_coeff)
    table = torch.tensor(used, dtype=torch.float64).reshape(len(steps), len(counts), 2)
    return parts[0][:offset], table
