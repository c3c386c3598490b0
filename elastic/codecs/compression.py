"""Horovod's `Compression`: what a user passes as `compression=`.

Dense compressors keep Horovod's interface, `compress(tensor) -> (tensor, ctx)` and
`decompress(tensor, ctx) -> tensor`, and only change the wire dtype around a collective.
`Compression.topk(...)` gives the settings of a top-k compressor (`elastic.codecs.topk`),
built once per optimizer since it keeps a residual.
"""

from __future__ import annotations

from typing import Any

import torch


class Compressor:
    """Interface for compressing and decompressing a tensor around a collective."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError


class NoneCompressor(Compressor):
    """Sends the tensor as it is."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor


class FP16Compressor(Compressor):
    """Sends floating-point tensors as float16, halving the bytes; restores the dtype after."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        dtype = tensor.dtype
        if dtype.is_floating_point:
            tensor = tensor.type(torch.float16)
        return tensor, dtype

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        dtype = ctx
        if dtype.is_floating_point:
            tensor = tensor.type(dtype)
        return tensor




class TopKCompression:
    """Settings of top-k sparsification (`hvd.Compression.topk(0.01)`), built per optimizer.

    Unlike the dense compressors this one keeps state (the residual of what was not
    sent), so `DistributedOptimizer` builds one `TopKCompressor` from it and exchanges
    (indices, values) by allgather instead of a dense allreduce.
    """

    def __init__(self, density: float = 0.01, fp16_values: bool = False,
                 error_feedback: bool = True, momentum_correction: bool = True,
                 clip_norm: float | None = None, warmup_steps: int = 0,
                 warmup_start_density: float = 1.0, min_sparse_numel: int = 1024) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"top-k density={density!r} must be in (0, 1], e.g. 0.01 for 1%")
        self.density = density
        self.fp16_values = fp16_values
        self.error_feedback = error_feedback
        self.momentum_correction = momentum_correction
        self.clip_norm = clip_norm
        self.warmup_steps = warmup_steps
        self.warmup_start_density = max(warmup_start_density, density)
        self.min_sparse_numel = min_sparse_numel

    def build(self, momentum: float = 0.0) -> Any:
        """A fresh `TopKCompressor` (momentum > 0: DGC's momentum correction)."""
        from elastic.codecs.topk import TopKCompressor

        return TopKCompressor(
            density=self.density, fp16_values=self.fp16_values,
            error_feedback=self.error_feedback, momentum=momentum, clip_norm=self.clip_norm,
            warmup_steps=self.warmup_steps, warmup_start_density=self.warmup_start_density,
            min_sparse_numel=self.min_sparse_numel)

    def __repr__(self) -> str:
        return (f"Compression.topk(density={self.density}, fp16_values={self.fp16_values}, "
                f"error_feedback={self.error_feedback})")


def _topk(density: float = 0.01, **options: Any) -> TopKCompression:
    """Top-k sparsification with error feedback; see `TopKCompression` for the options."""
    return TopKCompression(density, **options)


class Compression:
    """Namespace of the available compressors (`hvd.Compression.fp16`, `.topk(0.01)`)."""

    none = NoneCompressor
    fp16 = FP16Compressor
    topk = staticmethod(_topk)
