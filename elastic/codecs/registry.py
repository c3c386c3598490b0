"""Payload kinds by tag: how a received payload of each tag adds into a dense buffer.

Every payload names its kind in its header (`elastic.codecs.wire`), so a receiver decodes
any payload without knowing the sender's settings; an unknown tag is refused. Tags 0
(dense) and 1 (top-k) are built in; `register_decoder` adds another.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from elastic.codecs.wire import DENSE_TAG, TOPK_TAG, SparsePayload, SparsePayloadError

__all__ = ["Decoder", "register_decoder", "decoder_for", "add_into", "decompress"]

Decoder = Callable[[SparsePayload, torch.Tensor, float], None]
"""`decoder(payload, out, alpha)`: out += alpha * decoded(payload), for payloads of its tag."""

_DECODERS: dict[int, Decoder] = {}


def register_decoder(tag: int, decoder: Decoder) -> Decoder:
    """Make `decoder` the decoder of payloads tagged `tag` (0..255); a tag is taken once."""
    if not 0 <= tag <= 255:
        raise ValueError(f"payload tag {tag} must be in 0..255")
    if _DECODERS.get(tag, decoder) is not decoder:
        raise ValueError(f"payload tag {tag} is already registered to {_DECODERS[tag]!r}")
    _DECODERS[tag] = decoder
    return decoder


def decoder_for(tag: int) -> Decoder:
    """The decoder registered for `tag`; SparsePayloadError for an unknown tag."""
    try:
        return _DECODERS[tag]
    except KeyError:
        raise SparsePayloadError(
            f"no decoder registered for payload tag {tag} (known: {sorted(_DECODERS)})"
        ) from None


def add_into(payload: SparsePayload, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out += alpha * decoded(payload), by the decoder of the payload's tag; returns out."""
    if out.dim() != 1 or out.numel() != payload.numel:
        raise SparsePayloadError(
            f"cannot add a payload of numel={payload.numel} into a buffer of shape "
            f"{tuple(out.shape)}")
    decoder_for(payload.tag)(payload, out, alpha)
    return out


def decompress(payload: SparsePayload, device: torch.device | str | None = None) -> torch.Tensor:
    """The dense buffer (of the payload's dtype) the payload stands for."""
    device = payload.values.device if device is None else device
    return add_into(payload, torch.zeros(payload.numel, dtype=payload.dtype, device=device))


def _add_values(payload: SparsePayload, out: torch.Tensor, alpha: float) -> None:
    """The values at their indices (all of them for a dense payload)."""
    values = payload.values.to(device=out.device, dtype=out.dtype)
    if payload.indices is None:
        out.add_(values, alpha=alpha)
    else:
        out.index_add_(0, payload.indices.to(out.device), values, alpha=alpha)


register_decoder(DENSE_TAG, _add_values)
register_decoder(TOPK_TAG, _add_values)
