"""Horovod's gradient compressors for TensorFlow tensors, plus the shared top-k settings.

The interface and the no-op compressor are the framework-neutral ones of elastic.codecs.

Dense compressors change the wire dtype around a collective (`compress(tensor) ->
(tensor, ctx)`, `decompress(tensor, ctx) -> tensor`); `Compression.topk(0.01)` returns
the framework-neutral top-k settings that `DistributedGradientTape` and the Keras
`DistributedOptimizer` hand to Horde's shared top-k exchange.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from elastic.tensorflow._core_bridge import Compressor, NoneCompressor, TopKCompression


class FP16Compressor(Compressor):
    """Sends floating-point tensors as float16 and restores their dtype afterwards."""

    @staticmethod
    def compress(tensor: tf.Tensor) -> tuple[tf.Tensor, Any]:
        dtype = tensor.dtype
        if dtype.is_floating:
            tensor = tf.cast(tensor, tf.float16)
        return tensor, dtype

    @staticmethod
    def decompress(tensor: tf.Tensor, ctx: Any) -> tf.Tensor:
        if ctx.is_floating:
            tensor = tf.cast(tensor, ctx)
        return tensor


def _topk(density: float = 0.01, **options: Any) -> TopKCompression:
    """Top-k sparsification with error feedback (Horde's addition); see the PyTorch docs."""
    return TopKCompression(density, **options)


class Compression:
    """Namespace of the compressors: `hvd.Compression.none`, `.fp16`, `.topk(0.01)`."""

    none = NoneCompressor
    fp16 = FP16Compressor
    topk = staticmethod(_topk)


__all__ = ["Compression", "Compressor", "NoneCompressor", "FP16Compressor", "TopKCompression"]
