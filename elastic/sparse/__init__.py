"""Top-k gradient sparsification: fast selection, compressors with error feedback, and
deterministic sparse aggregation (see docs of each module)."""

from __future__ import annotations

from elastic.sparse.aggregate import allgather_bytes, allreduce_bytes, scatter_add_payloads
from elastic.sparse.compressor import (
    DENSE_TAG,
    HEADER_BYTES,
    TOPK_TAG,
    Codec,
    SparseCompressor,
    SparsePayload,
    SparsePayloadError,
    TopKCompressor,
    add_into,
    all_finite,
    break_even_density,
    codec_for,
    decompress,
    pack_payloads,
    register_codec,
    unpack_payloads,
)
from elastic.sparse.selection import (
    Selection,
    SelectionConfig,
    group_size,
    sample_size,
    select_topk,
)

__all__ = [
    "DENSE_TAG", "HEADER_BYTES", "TOPK_TAG", "Codec", "Selection", "SelectionConfig",
    "SparseCompressor", "SparsePayload", "SparsePayloadError", "TopKCompressor", "add_into",
    "all_finite", "allgather_bytes", "allreduce_bytes", "break_even_density", "codec_for",
    "decompress", "pack_payloads", "register_codec", "sample_size", "scatter_add_payloads",
    "select_topk", "unpack_payloads", "group_size",
]
