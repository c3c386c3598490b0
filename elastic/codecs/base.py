"""The codec interface: how a flat gradient goes on the wire, and how received bytes come back.

One small interface for every gradient encoding that staleness rounds and top-k use:
`encode` a flat gradient into bytes, take the `norm` of received bytes (checked before
anything is added, so a malformed contribution is only rejected), and `decode_add` them
into a buffer. `DenseCodec` sends every value; `PayloadCodec` (`elastic.codecs.payload`)
sends self-describing payloads (`elastic.codecs.wire`) such as top-k's.
"""

from __future__ import annotations

import torch

__all__ = ["Codec", "DenseCodec"]


class Codec:
    """Turns a flat gradient into bytes for the wire and adds received bytes into a buffer."""

    tag = "base"
    encodes_each = False
    """Encode every gradient when it is submitted, in the submitting thread, and send a
    member's pending gradients as separate parts. For codecs whose encoding costs about
    as much as the round's communication (top-k with error feedback): encoding then
    overlaps the previous round instead of lengthening this one. Otherwise a member's
    pending gradients are averaged and encoded once, at the round."""

    def encode(self, flat: torch.Tensor, step: int) -> torch.Tensor:
        """A uint8 tensor carrying `flat` (possibly compressed)."""
        raise NotImplementedError

    def norm(self, data: torch.Tensor, numel: int) -> float:
        """Norm of the values `data` carries for a buffer of `numel` values.

        Raises ValueError when `data` cannot be decoded into such a buffer; checked
        before anything is added, so a malformed contribution is only rejected.
        """
        raise NotImplementedError

    def decode_add(self, data: torch.Tensor, out: torch.Tensor, weight: float) -> None:
        """Add `weight` * decoded(data) into `out`."""
        raise NotImplementedError

    def density(self, step: int) -> float:
        return 1.0

    def residual_norm(self) -> float:
        return 0.0


class DenseCodec(Codec):
    """Sends every value, as float32 or float16."""

    def __init__(self, fp16: bool = False) -> None:
        self.dtype = torch.float16 if fp16 else torch.float32
        self.tag = "dense-fp16" if fp16 else "dense-fp32"

    def encode(self, flat: torch.Tensor, step: int) -> torch.Tensor:
        return flat.detach().to(self.dtype).contiguous().view(torch.uint8).reshape(-1)

    def norm(self, data: torch.Tensor, numel: int) -> float:
        if data.numel() % self.dtype.itemsize or data.numel() // self.dtype.itemsize != numel:
            raise ValueError(f"dense payload of {data.numel()} bytes for {numel} values")
        return float(data.view(self.dtype).float().norm())

    def decode_add(self, data: torch.Tensor, out: torch.Tensor, weight: float) -> None:
        values = data.view(self.dtype)
        if values.numel() != out.numel():
            raise ValueError(f"dense payload of {values.numel()} values for {out.numel()}")
        out.add_(values.to(out.dtype), alpha=weight)
