"""`PayloadCodec`: a flat gradient as `HSP1` payloads, top-k of its large part, the rest dense.

The codec of the top-k exchanges (synchronous and with staleness): a gradient laid out
with its large parameters first (`sparse_numel` values) is sent as at most two payloads
(`elastic.codecs.wire`), decoded by tag (`elastic.codecs.registry`). What top-k does not
send stays in the compressor's residual (error feedback); `settle` returns to it the part
of a sent gradient that its round did not apply.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import torch

from elastic.codecs.base import Codec
from elastic.codecs.registry import add_into
from elastic.codecs.topk import TopKCompressor
from elastic.codecs.wire import DENSE_TAG, SparsePayload, pack_payloads, unpack_payloads

__all__ = ["FlatSplit", "PayloadCodec"]


class FlatSplit(Protocol):
    """How a flat gradient splits: its first `sparse_numel` values are sparsified."""

    sparse_numel: int
    numel: int


class PayloadCodec(Codec):
    """Encodes a flat gradient as payloads: top-k of the large part, dense small part
    (`layout.sparse_numel` values first, `layout.numel` in all)."""

    tag = "horde-payloads"

    def __init__(self, layout: FlatSplit, compressor: TopKCompressor | None,
                 world_size: int, fp16_dense: bool = False) -> None:
        self.layout = layout
        self.compressor = compressor
        self.world_size = world_size
        self.fp16_dense = fp16_dense
        # Top-k with error feedback: each step's gradient is compressed when submitted.
        self.encodes_each = compressor is not None
        # The sparsified part of each gradient encoded, in order, until its round says
        # how much of it was applied (what was not goes back to the residual).
        self.sent: deque[SparsePayload | None] = deque()
        # The share of a new gradient that enters the compressor's velocity (the rest
        # enters the residual directly): w(s) of the staleness s this member's last
        # accepted contribution had, the staleness its next one will most likely have
        # (set by the exchange; 1 until then). A delayed gradient repeated by momentum
        # 1/(1-m) times is what destabilises stale top-k with momentum (issue 9).
        self.intake = 1.0

    def payloads(self, flat: torch.Tensor, step: int) -> list[SparsePayload]:
        ns, n = self.layout.sparse_numel, self.layout.numel
        out: list[SparsePayload] = []
        if ns:
            if self.compressor is not None:
                out.append(self.compressor.compress("gradients", flat[:ns], step,
                                                    world_size=self.world_size,
                                                    intake=self.intake))
            else:
                out.append(self._dense(flat[:ns]))
        if n > ns:
            out.append(self._dense(flat[ns:]))
        return out

    def _dense(self, part: torch.Tensor) -> SparsePayload:
        values = part.to(torch.float16) if self.fp16_dense else part.clone()
        return SparsePayload(None, values, part.numel(), part.dtype, DENSE_TAG)

    def encode(self, flat: torch.Tensor, step: int) -> torch.Tensor:
        payloads = self.payloads(flat, step)
        if self.compressor is not None:
            self.sent.append(payloads[0] if self.layout.sparse_numel else None)
        return pack_payloads(payloads)

    def settle(self, applied: float) -> None:
        """The oldest encoded gradient's round is known: `applied` (0 to 1) of it entered
        the parameters at full step size; the rest returns to the residual (error
        feedback), so a contribution dropped as too stale or down-weighted is delayed,
        not lost."""
        payload = self.sent.popleft() if self.sent else None
        residual = self.compressor.residual("gradients") if self.compressor else None
        if payload is not None and residual is not None and applied < 1.0:
            add_into(payload, residual, 1.0 - applied)

    def _split(self, data: torch.Tensor) -> list[SparsePayload]:
        """The payloads of one member's message, their structure checked (headers, sizes,
        indices); values are not scanned here: `norm` turns a non-finite value into a
        non-finite norm, which the round's norm check rejects."""
        ns, n = self.layout.sparse_numel, self.layout.numel
        expected = [size for size in (ns, n - ns) if size]
        payloads, end = unpack_payloads(data, numels=expected, validate=False)
        if end != data.numel():
            raise ValueError(f"{data.numel() - end} bytes follow the payloads for buffers "
                             f"{expected}")
        for payload in payloads:
            payload.validate(values=False)
        return payloads

    def norm(self, data: torch.Tensor, numel: int) -> float:
        total = 0.0
        for payload in self._split(data):
            total += float(torch.linalg.vector_norm(payload.values, dtype=torch.float32)) ** 2
        return total ** 0.5

    def decode_add(self, data: torch.Tensor, out: torch.Tensor, weight: float) -> None:
        """Add the payloads into `out`; `data` must have passed `norm` (the rounds check
        every contribution's norm before adding any)."""
        ns = self.layout.sparse_numel
        parts = [out[:ns], out[ns:]] if ns else [out]
        for payload, part in zip(self._split(data), [p for p in parts if p.numel()]):
            add_into(payload, part, weight)

    def density(self, step: int) -> float:
        return self.compressor.density(step) if self.compressor is not None else 1.0

    def residual_norm(self) -> float:
        return self.compressor.residual_norm() if self.compressor is not None else 0.0
