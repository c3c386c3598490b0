"""Top-k sparsification with error feedback: the compressor behind `Compression.topk`.

Deep Gradient Compression's options: momentum correction, local clipping and a density
warm-up. A compressor keeps one residual per named buffer; `compress(name, grad, step)`
returns a `SparsePayload` (`elastic.codecs.wire`: int32 indices ascending + fp16/fp32
values, or the whole buffer for a dense step), which any rank decodes through the payload
registry (`elastic.codecs.registry`) without knowing the sender's settings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from elastic.codecs.selection import DEFAULT_CONFIG, SelectionConfig, select_topk
from elastic.codecs.wire import DENSE_TAG, TOPK_TAG, SparsePayload, all_finite

logger = logging.getLogger(__name__)

__all__ = ["TopKCompressor", "break_even_density"]

_FP16_MAX = float(torch.finfo(torch.float16).max)


def break_even_density(world_size: int, value_bytes: int, index_bytes: int = 4,
                       dense_bytes: int = 4) -> float:
    """The density above which a dense ring allreduce moves fewer bytes than a sparse
    allgather: 2 * dense_bytes / (world_size * (index_bytes + value_bytes)), at most 1.

    Per rank, a ring allreduce sends 2 (N-1)/N * d * dense_bytes; an allgather of
    k = density * d (index, value) pairs from every rank receives (N-1) * k *
    (index_bytes + value_bytes). Equal at the density above (1/N for fp32 pairs).
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive integer")
    if min(value_bytes, dense_bytes) <= 0 or index_bytes < 0:
        raise ValueError(
            f"byte sizes must be positive (value_bytes={value_bytes}, "
            f"index_bytes={index_bytes}, dense_bytes={dense_bytes})")
    return min(1.0, 2.0 * dense_bytes / (world_size * (index_bytes + value_bytes)))


# -- compressors ----------------------------------------------------------------------

@dataclass
class _BufferState:
    """Per named buffer: residual v (error feedback), velocity u (momentum), hint."""

    numel: int
    dtype: torch.dtype
    residual: torch.Tensor | None = None
    velocity: torch.Tensor | None = None
    hint: torch.Tensor | None = None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class TopKCompressor:
    """Top-k sparsification with error feedback (Deep Gradient Compression's options).

    Per step and buffer: clip the gradient to `clip_norm / sqrt(world_size)`; with
    `momentum` m, u = m*u + g and v += u (else v += g); send the top `density(step)`
    entries of v by magnitude; v keeps what was not sent, including the rounding of
    fp16 values; u is zeroed where sent (momentum factor masking). A dense step (small
    buffer, or density above the allgather's break-even) sends all of v and keeps u,
    which is then plain heavy-ball momentum. Without error feedback the unsent part of
    each step is dropped (an ablation). Its payloads carry `TAG` (or the dense tag).
    """

    TAG = TOPK_TAG

    def __init__(self, density: float = 0.01, fp16_values: bool = False,
                 error_feedback: bool = True, momentum: float = 0.0,
                 clip_norm: float | None = None, warmup_steps: int = 0,
                 warmup_start_density: float = 1.0, min_sparse_numel: int = 1024,
                 selection: SelectionConfig = DEFAULT_CONFIG) -> None:
        self._buffers: dict[str, _BufferState] = {}
        _require(0.0 < density <= 1.0, f"density={density!r} must be in (0, 1]")
        _require(0.0 <= momentum < 1.0, f"momentum={momentum!r} must be in [0, 1)")
        _require(clip_norm is None or clip_norm > 0,
                 f"clip_norm={clip_norm!r} must be positive or None")
        _require(isinstance(warmup_steps, int) and warmup_steps >= 0,
                 f"warmup_steps={warmup_steps!r} must be a non-negative integer")
        _require(density <= warmup_start_density <= 1.0,
                 f"warmup_start_density={warmup_start_density!r} must be in "
                 f"[density={density}, 1]")
        _require(isinstance(min_sparse_numel, int) and min_sparse_numel >= 0,
                 f"min_sparse_numel={min_sparse_numel!r} must be a non-negative integer")
        self.target_density = float(density)
        self.value_dtype = torch.float16 if fp16_values else torch.float32
        self.error_feedback = bool(error_feedback)
        self.momentum = float(momentum)
        self.clip_norm = clip_norm
        self.warmup_steps = warmup_steps
        self.warmup_start_density = float(warmup_start_density)
        self.min_sparse_numel = min_sparse_numel
        self.selection = selection
        self.skipped_steps = 0  # steps whose gradient held NaN/Inf (sent nothing)

    def density(self, step: int) -> float:
        """Exponential warm-up from `warmup_start_density` (step 0) to the target density
        (step `warmup_steps` and later)."""
        if step >= self.warmup_steps:
            return self.target_density
        frac = max(step, 0) / self.warmup_steps
        return self.warmup_start_density * (
            self.target_density / self.warmup_start_density) ** frac

    def prefers_dense(self, numel: int, step: int, world_size: int) -> bool:
        """Whether `compress` sends this buffer dense: too small, or a density at or above
        the break-even of the allgather. The same on every rank for the same step."""
        vbytes = self.value_dtype.itemsize
        return (numel < self.min_sparse_numel or self.density(step) >= 1.0
                or self.density(step) >= break_even_density(world_size, vbytes,
                                                            dense_bytes=vbytes))

    def compress(self, name: str, flat_grad: torch.Tensor, step: int, *, world_size: int = 1,
                 dense: bool | None = None, intake: float = 1.0) -> SparsePayload:
        """Compress one step's gradient of buffer `name` (any shape, sent flat).

        `dense=None` decides with `prefers_dense(numel, step, world_size)`. `intake` (0
        to 1): the share of the gradient that enters the velocity; the rest enters the
        residual directly, sent once instead of repeated by momentum. With staleness the
        gradient is applied some aggregates late, and a delayed gradient repeated
        1/(1-m) times is what makes momentum unstable (see `elastic.staleness.exchange`).
        """
        if not 0.0 <= intake <= 1.0:
            raise ValueError(f"intake={intake!r} must be in [0, 1]")
        grad = flat_grad.detach().reshape(-1)
        if not grad.dtype.is_floating_point:
            raise ValueError(f"buffer {name!r}: gradients must be floating point, got {grad.dtype}")
        numel = grad.numel()
        state = self._state_for(name, grad)
        if not all_finite(grad):
            # Accumulating it would poison the residual (and velocity) for good.
            self.skipped_steps += 1
            logger.warning("top-k: the gradient of %r holds NaN/Inf at step %d; this step "
                           "sends nothing and leaves the residual as it was", name, step)
            empty = torch.empty(0, dtype=torch.int32, device=grad.device)
            return SparsePayload(empty, grad.new_empty(0, dtype=self.value_dtype), numel,
                                 grad.dtype, self.TAG)
        acc_dtype = _accumulation_dtype(grad.dtype)
        g = grad.to(acc_dtype)
        if self.clip_norm is not None:
            g = self._clip(g, world_size, copy=g is grad)
        if self.momentum > 0.0:
            if state.velocity is None:
                state.velocity = torch.zeros(numel, dtype=acc_dtype, device=grad.device)
            if intake == 1.0:  # u = m*u + g in one pass over u.
                increment = torch.add(g, state.velocity, alpha=self.momentum,
                                      out=state.velocity)
            else:  # u = m*u + intake*g; what enters v: u + (1 - intake)*g
                state.velocity.mul_(self.momentum).add_(g, alpha=intake)
                increment = torch.add(state.velocity, g, alpha=1.0 - intake)
        else:
            increment = g
        if self.error_feedback:
            if state.residual is None:
                state.residual = torch.zeros(numel, dtype=acc_dtype, device=grad.device)
            acc = state.residual.add_(increment)
        else:
            acc = increment
        if dense is None:
            dense = self.prefers_dense(numel, step, world_size)
        if dense:
            values = self._wire_values(acc, copy=True)
            if self.error_feedback:
                acc.sub_(values.to(acc_dtype))
            return SparsePayload(None, values, numel, grad.dtype, DENSE_TAG)

        k = max(1, round(self.density(step) * numel))
        sel = select_topk(acc, k, hint=state.hint, config=self.selection)
        state.hint = sel.hint
        values = self._wire_values(sel.values, copy=False)
        if self.error_feedback:
            acc.index_add_(0, sel.indices, values.to(acc_dtype), alpha=-1.0)
        if state.velocity is not None:
            state.velocity.index_fill_(0, sel.indices.long(), 0.0)
        return SparsePayload(sel.indices, values, numel, grad.dtype, self.TAG)

    def residual_norm(self, name: str | None = None) -> float:
        """L2 norm of the residual of one buffer, or of all of them (0 without feedback,
        or for a buffer not seen yet). One host sync per buffer on CUDA."""
        if name is None:
            states = list(self._buffers.values())
        else:
            states = [self._buffers[name]] if name in self._buffers else []
        total = 0.0
        for state in states:
            if state.residual is not None:
                total += float(torch.linalg.vector_norm(state.residual)) ** 2
        return math.sqrt(total)

    def residual(self, name: str) -> torch.Tensor | None:
        """The residual of a buffer (a live view; None before its first step)."""
        state = self._buffers.get(name)
        return None if state is None else state.residual

    def reset(self, name: str | None = None) -> None:
        """Forget the residual and velocity of one buffer, or of all."""
        if name is None:
            self._buffers.clear()
        else:
            self._buffers.pop(name, None)

    def state_dict(self) -> dict[str, Any]:
        """Residuals, velocities and hints per buffer (cloned), for elastic state."""
        def clone(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().clone()

        return {
            "format": 1,
            "tag": self.TAG,
            "buffers": {
                name: {"numel": s.numel, "dtype": str(s.dtype).removeprefix("torch."),
                       "residual": clone(s.residual), "velocity": clone(s.velocity),
                       "hint": clone(s.hint)}
                for name, s in self._buffers.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (tensors are copied)."""
        if state.get("format") != 1 or not isinstance(state.get("buffers"), Mapping):
            raise ValueError(
                "not a sparse compressor state_dict (expected format 1 with 'buffers'), got "
                f"keys {sorted(state)}")
        buffers: dict[str, _BufferState] = {}
        for name, entry in state["buffers"].items():
            dtype = getattr(torch, str(entry["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"buffer {name!r}: unknown dtype {entry['dtype']!r}")
            numel = int(entry["numel"])
            restored = _BufferState(numel, dtype)
            for key in ("residual", "velocity"):
                t = entry.get(key)
                if t is not None:
                    if t.numel() != numel:
                        raise ValueError(
                            f"buffer {name!r}: {key} has {t.numel()} entries, expected {numel}")
                    setattr(restored, key, t.detach().clone().reshape(-1))
            if entry.get("hint") is not None:
                restored.hint = entry["hint"].detach().clone()
            buffers[name] = restored
        self._buffers = buffers

    def _clip(self, g: torch.Tensor, world_size: int, copy: bool) -> torch.Tensor:
        """DGC's local clipping: scale g to norm at most clip_norm / sqrt(world_size)."""
        limit = self.clip_norm / math.sqrt(max(world_size, 1))
        factor = torch.clamp(limit / (torch.linalg.vector_norm(g) + 1e-12), max=1.0)
        return g * factor if copy else g.mul_(factor)

    def _wire_values(self, values: torch.Tensor, copy: bool) -> torch.Tensor:
        """Values in the wire dtype, never aliasing `values` when `copy` (it may be v)."""
        if self.value_dtype == torch.float16:
            # Clamp so no value overflows to inf; error feedback keeps the excess.
            return values.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
        return values.to(self.value_dtype, copy=copy)

    def _state_for(self, name: str, grad: torch.Tensor) -> _BufferState:
        state = self._buffers.get(name)
        if state is None:
            state = self._buffers[name] = _BufferState(grad.numel(), grad.dtype)
            return state
        if state.numel != grad.numel():
            raise ValueError(
                f"buffer {name!r} had {state.numel} entries and now has {grad.numel()}; "
                "call reset(name) when a buffer changes size")
        for key in ("residual", "velocity", "hint"):
            t = getattr(state, key)
            if t is not None and t.device != grad.device:
                setattr(state, key, t.to(grad.device))
        return state


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Residuals of half-precision gradients accumulate in fp32 (no mass lost to rounding)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

