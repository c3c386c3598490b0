"""Gradient codecs, one family: how gradients are compressed, put on the wire and decoded.

- `base`: the codec interface (`Codec`: encode, norm, decode_add) and `DenseCodec`.
- `wire`: the `HSP1` payload format; `registry`: payload decoders by tag.
- `topk`: top-k with error feedback (`TopKCompressor`), `selection`: its fast selection;
  `payload`: `PayloadCodec`, a flat gradient as payloads; `aggregate`: sums and byte counts.
- `compression`: Horovod's `Compression` (none, fp16, topk) as users pass it.
"""

from __future__ import annotations

from elastic.codecs.aggregate import allgather_bytes, allreduce_bytes, scatter_add_payloads
from elastic.codecs.base import Codec, DenseCodec
from elastic.codecs.compression import (
    Compression,
    Compressor,
    FP16Compressor,
    NoneCompressor,
    TopKCompression,
)
from elastic.codecs.payload import PayloadCodec
from elastic.codecs.registry import add_into, decoder_for, decompress, register_decoder
from elastic.codecs.selection import (
    Selection,
    SelectionConfig,
    group_size,
    sample_size,
    select_topk,
)
from elastic.codecs.topk import TopKCompressor, break_even_density
from elastic.codecs.wire import (
    DENSE_TAG,
    HEADER_BYTES,
    TOPK_TAG,
    SparsePayload,
    SparsePayloadError,
    all_finite,
    pack_payloads,
    unpack_payloads,
)

__all__ = [
    "Codec", "Compression", "Compressor", "DENSE_TAG", "DenseCodec", "FP16Compressor",
    "HEADER_BYTES", "NoneCompressor", "PayloadCodec", "Selection", "SelectionConfig",
    "SparsePayload", "SparsePayloadError", "TOPK_TAG", "TopKCompression", "TopKCompressor",
    "add_into", "all_finite", "allgather_bytes", "allreduce_bytes", "break_even_density",
    "decoder_for", "decompress", "group_size", "pack_payloads", "register_decoder",
    "sample_size", "scatter_add_payloads", "select_topk", "unpack_payloads",
]
