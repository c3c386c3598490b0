"""The wire format of a compressed buffer (`HSP1` payloads), on its own.

A payload is `values` at `indices` of a dense `numel`-entry buffer (or the whole buffer
for a dense payload), tagged with the kind that decodes it (`elastic.codecs.registry`).
Wire form: a 24-byte little-endian header (magic `HSP1`, tag, value dtype, buffer dtype,
flags, numel, count), int32 indices in ascending order, then the values, padded to a
multiple of 8 bytes, so payloads concatenate and stay aligned. Every field read from the
wire is checked before use: a peer must not choose how much a receiver allocates.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rendezvous.errors import HordeError

__all__ = [
    "DENSE_TAG", "TOPK_TAG", "HEADER_BYTES", "SparsePayloadError", "SparsePayload",
    "pack_payloads", "unpack_payloads", "all_finite",
]

DENSE_TAG = 0
TOPK_TAG = 1

_MAGIC = b"HSP1"
_HEADER = struct.Struct("<4sBBBBqq")  # magic, tag, value dtype, dense dtype, flags, numel, count
HEADER_BYTES = _HEADER.size  # 24: keeps the int32 indices that follow 8-byte aligned
_ALIGN = 8
_FLAG_DENSE = 1

_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.float16, 3: torch.bfloat16, 4: torch.float64,
}
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class SparsePayloadError(HordeError, ValueError):
    """A payload is malformed (bad header, indices out of range or unsorted, NaN/Inf)."""


def _pad(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True, eq=False)
class SparsePayload:
    """One compressed buffer: `values` at `indices` of a dense `numel`-entry `dtype` buffer.

    `indices` is None for a dense payload (`values` is then the whole buffer). `tag`
    names the kind that decodes it (`elastic.codecs.registry`). Wire form: a 24-byte
    header, then int32 indices, then values, padded to a multiple of 8 bytes, so
    payloads concatenate.
    """

    indices: torch.Tensor | None
    values: torch.Tensor
    numel: int
    dtype: torch.dtype
    tag: int = TOPK_TAG

    @property
    def is_dense(self) -> bool:
        return self.indices is None

    @property
    def count(self) -> int:
        """Entries carried (numel for a dense payload)."""
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of the wire form (header, indices, values, padding)."""
        index_bytes = 0 if self.indices is None else 4 * self.count
        return HEADER_BYTES + _pad(index_bytes + self.values.element_size() * self.count)

    def to_bytes(self) -> torch.Tensor:
        """The wire form as a uint8 tensor on the values' device."""
        if self.values.dtype not in _DTYPE_CODES or self.dtype not in _DTYPE_CODES:
            raise SparsePayloadError(
                f"cannot encode values of {self.values.dtype} for a {self.dtype} buffer; "
                f"supported: {sorted(str(d) for d in _DTYPE_CODES)}")
        flags = _FLAG_DENSE if self.indices is None else 0
        header = _HEADER.pack(_MAGIC, self.tag, _DTYPE_CODES[self.values.dtype],
                              _DTYPE_CODES[self.dtype], flags, self.numel, self.count)
        device = self.values.device
        parts = [torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device)]
        if self.indices is not None:
            parts.append(self.indices.to(torch.int32).contiguous().view(torch.uint8))
        parts.append(self.values.contiguous().view(torch.uint8))
        body = sum(p.numel() for p in parts[1:])
        if _pad(body) > body:
            parts.append(torch.zeros(_pad(body) - body, dtype=torch.uint8, device=device))
        return torch.cat(parts)

    @classmethod
    def from_bytes(cls, buf: torch.Tensor, offset: int = 0, *, validate: bool = True,
                   numel: int | None = None) -> SparsePayload:
        """Decode the payload at `offset` of a uint8 buffer (zero-copy views into it).

        The header is always checked (and its numel against `numel` when given: an
        untrusted peer must not choose how much a receiver allocates); `validate` also
        checks that indices are strictly ascending and in range and values finite. On
        CUDA the header read is one small device-to-host copy.
        """
        if buf.dtype != torch.uint8 or buf.dim() != 1:
            raise SparsePayloadError(
                f"a payload buffer is a flat uint8 tensor, got {buf.dtype} of shape "
                f"{tuple(buf.shape)}")
        if offset % _ALIGN or offset < 0 or offset + HEADER_BYTES > buf.numel():
            raise SparsePayloadError(
                f"no payload header at offset {offset} of a {buf.numel()}-byte buffer "
                f"(offsets are multiples of {_ALIGN})")
        raw = bytes(buf[offset:offset + HEADER_BYTES].cpu().tolist())
        magic, tag, vcode, dcode, flags, size, count = _HEADER.unpack(raw)
        if magic != _MAGIC:
            raise SparsePayloadError(f"bad payload magic {magic!r} at offset {offset}")
        if vcode not in _DTYPES or dcode not in _DTYPES:
            raise SparsePayloadError(f"unknown dtype codes {vcode}/{dcode} in payload header")
        from elastic.codecs.registry import decoder_for

        decoder_for(tag)  # an unknown tag is refused before anything is read
        dense = bool(flags & _FLAG_DENSE)
        if size < 0 or count < 0 or count > size or (dense and count != size):
            raise SparsePayloadError(
                f"payload header carries count={count} for numel={size} (dense={dense})")
        if numel is not None and size != numel:
            raise SparsePayloadError(
                f"payload at offset {offset} is for a buffer of {size} entries, "
                f"expected {numel}")
        vdtype = _DTYPES[vcode]
        vsize = torch.empty((), dtype=vdtype).element_size()
        start = offset + HEADER_BYTES
        index_end = start + (0 if dense else 4 * count)
        value_end = index_end + vsize * count
        if start + _pad(value_end - start) > buf.numel():
            raise SparsePayloadError(
                f"payload at offset {offset} needs {HEADER_BYTES + _pad(value_end - start)} "
                f"bytes, the buffer has {buf.numel() - offset}")
        indices = None if dense else _view(buf, start, index_end, torch.int32)
        values = _view(buf, index_end, value_end, vdtype)
        payload = cls(indices, values, int(size), _DTYPES[dcode], int(tag))
        if validate:
            payload.validate()
        return payload

    def validate(self, values: bool = True) -> None:
        """Raise SparsePayloadError unless indices are strictly ascending in range and
        (with `values`) values finite (a host sync or two on CUDA).

        `values=False` checks the structure only, for a caller that computes the norm
        anyway (a non-finite value makes it non-finite): one pass fewer over the values.
        """
        if self.values.dim() != 1:
            raise SparsePayloadError(f"payload values must be 1-D, got {tuple(self.values.shape)}")
        idx = self.indices
        if idx is None:
            if self.count != self.numel:
                raise SparsePayloadError(
                    f"a dense payload carries {self.count} values for numel={self.numel}")
        else:
            if idx.dtype != torch.int32 or idx.shape != self.values.shape:
                raise SparsePayloadError(
                    "payload indices must be int32 of the values' shape "
                    f"{tuple(self.values.shape)}, got {idx.dtype} {tuple(idx.shape)}")
            if idx.numel():
                bad = (idx[0] < 0) | (idx[-1] >= self.numel)
                if idx.numel() > 1:
                    bad = bad | ~(idx[1:] > idx[:-1]).all()
                if bool(bad):
                    raise SparsePayloadError(
                        f"payload (tag {self.tag}, {self.count} of {self.numel} entries) has "
                        "indices out of range or not strictly ascending")
        if values and not all_finite(self.values):
            raise SparsePayloadError(
                f"payload (tag {self.tag}, {self.count} of {self.numel} entries) has "
                "non-finite values")


def all_finite(t: torch.Tensor) -> bool:
    """Whether `t` holds no NaN/Inf. A NaN or Inf makes the sum non-finite, so a finite
    sum (one fast reduction) settles it; only a non-finite sum, which overflow of finite
    values can also give, pays for the exact elementwise check."""
    if t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _view(buf: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """buf[start:end] reinterpreted as dtype; copied first when misaligned for it."""
    part = buf[start:end]
    if part.storage_offset() % torch.empty((), dtype=dtype).element_size():
        part = part.clone()
    return part.view(dtype)


def pack_payloads(payloads: list[SparsePayload]) -> torch.Tensor:
    """Concatenate payloads' wire forms into one uint8 tensor (each is self-delimiting)."""
    if not payloads:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([p.to_bytes() for p in payloads])


def unpack_payloads(buf: torch.Tensor, offset: int = 0, count: int | None = None, *,
                    validate: bool = True, numels: Sequence[int] | None = None
                    ) -> tuple[list[SparsePayload], int]:
    """Decode `count` payloads (default: `len(numels)`, else to the end) from `offset`;
    returns them and the offset after the last one. `numels`: the expected buffer sizes."""
    if count is None and numels is not None:
        count = len(numels)
    out: list[SparsePayload] = []
    while (count is None and offset < buf.numel()) or (count is not None and len(out) < count):
        expected = None if numels is None else numels[len(out)]
        payload = SparsePayload.from_bytes(buf, offset, validate=validate, numel=expected)
        out.append(payload)
        offset += payload.nbytes
    return out, offset
