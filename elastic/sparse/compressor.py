"""Sparse gradient compressors: top-k with error feedback, DGC-style momentum correction,
local clipping and a density warm-up; and the self-describing wire payload they produce.

A compressor keeps one residual per named buffer. `compress(name, grad, step)` returns a
`SparsePayload` (int32 indices ascending + fp16/fp32 values, or the whole buffer for a
dense step); any rank decodes it with `add_into` through the codec registry, keyed by
the tag the payload carries, without knowing the sender's settings.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from elastic.sparse.selection import DEFAULT_CONFIG, SelectionConfig, select_topk
from rendezvous.errors import HordeError

logger = logging.getLogger(__name__)

__all__ = [
    "DENSE_TAG", "TOPK_TAG", "HEADER_BYTES", "SparsePayloadError", "SparsePayload",
    "SparseCompressor", "TopKCompressor", "register_codec", "codec_for", "add_into",
    "decompress", "pack_payloads", "unpack_payloads", "break_even_density", "all_finite",
]

DENSE_TAG = 0
TOPK_TAG = 1

_MAGIC = b"HSP1"
_HEADER = struct.Struct("<4sBBBBqq")  # magic, tag, value dtype, dense dtype, flags, numel, count
HEADER_BYTES = _HEADER.size  # 24: keeps the int32 indices that follow 8-byte aligned
_ALIGN = 8
_FLAG_DENSE = 1
_FP16_MAX = float(torch.finfo(torch.float16).max)

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
    names the codec that decodes it. Wire form: a 24-byte header, then int32 indices,
    then values, padded to a multiple of 8 bytes, so payloads concatenate.
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
        codec_for(tag)
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


# -- codec registry -------------------------------------------------------------------

_CODECS: dict[int, type[Codec]] = {}


class Codec:
    """Decodes payloads of one tag into a dense buffer; registered with `register_codec`."""

    TAG: ClassVar[int]

    @classmethod
    def add_payload(cls, payload: SparsePayload, out: torch.Tensor, alpha: float) -> None:
        """out += alpha * decoded(payload). Payloads of this tag only."""
        values = payload.values.to(device=out.device, dtype=out.dtype)
        if payload.indices is None:
            out.add_(values, alpha=alpha)
        else:
            out.index_add_(0, payload.indices.to(out.device), values, alpha=alpha)


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make `cls` the decoder of payloads tagged `cls.TAG` (0..255)."""
    tag = cls.TAG
    if not 0 <= tag <= 255:
        raise ValueError(f"codec tag {tag} must be in 0..255")
    if _CODECS.get(tag, cls) is not cls:
        raise ValueError(f"codec tag {tag} is already registered to {_CODECS[tag].__name__}")
    _CODECS[tag] = cls
    return cls


def codec_for(tag: int) -> type[Codec]:
    """The codec registered for `tag`; SparsePayloadError for an unknown tag."""
    try:
        return _CODECS[tag]
    except KeyError:
        raise SparsePayloadError(
            f"no codec registered for payload tag {tag} (known: {sorted(_CODECS)})") from None


def add_into(payload: SparsePayload, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out += alpha * decoded(payload), by the codec of the payload's tag; returns out."""
    if out.dim() != 1 or out.numel() != payload.numel:
        raise SparsePayloadError(
            f"cannot add a payload of numel={payload.numel} into a buffer of shape "
            f"{tuple(out.shape)}")
    codec_for(payload.tag).add_payload(payload, out, alpha)
    return out


def decompress(payload: SparsePayload, device: torch.device | str | None = None) -> torch.Tensor:
    """The dense buffer (of the payload's dtype) the payload stands for."""
    device = payload.values.device if device is None else device
    return add_into(payload, torch.zeros(payload.numel, dtype=payload.dtype, device=device))


@register_codec
class DenseCodec(Codec):
    """The whole buffer as values (warm-up steps, small buffers)."""

    TAG = DENSE_TAG


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


class SparseCompressor(Codec):
    """Base of stateful sparse compressors: a residual per named buffer, a payload per call.

    Subclasses implement `compress` and `density`, set `TAG` and register with
    `register_codec`; decoding goes through the codec registry, so `decompress` and
    `add_into` accept payloads of any registered tag.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, _BufferState] = {}

    def compress(self, name: str, flat_grad: torch.Tensor, step: int, *, world_size: int = 1,
                 dense: bool | None = None) -> SparsePayload:
        raise NotImplementedError

    def density(self, step: int) -> float:
        raise NotImplementedError

    @staticmethod
    def decompress(payload: SparsePayload) -> torch.Tensor:
        """The dense buffer a payload (of any registered tag) stands for."""
        return decompress(payload)

    @staticmethod
    def add_into(payload: SparsePayload, dense: torch.Tensor, alpha: float = 1.0
                 ) -> torch.Tensor:
        """dense += alpha * decoded(payload); returns dense."""
        return add_into(payload, dense, alpha)

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


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@register_codec
class TopKCompressor(SparseCompressor):
    """Top-k sparsification with error feedback (Deep Gradient Compression's options).

    Per step and buffer: clip the gradient to `clip_norm / sqrt(world_size)`; with
    `momentum` m, u = m*u + g and v += u (else v += g); send the top `density(step)`
    entries of v by magnitude; v keeps what was not sent, including the rounding of
    fp16 values; u is zeroed where sent (momentum factor masking). A dense step (small
    buffer, or density above the allgather's break-even) sends all of v and keeps u,
    which is then plain heavy-ball momentum. Without error feedback the unsent part of
    each step is dropped (an ablation).
    """

    TAG = TOPK_TAG

    def __init__(self, density: float = 0.01, fp16_values: bool = False,
                 error_feedback: bool = True, momentum: float = 0.0,
                 clip_norm: float | None = None, warmup_steps: int = 0,
                 warmup_start_density: float = 1.0, min_sparse_numel: int = 1024,
                 selection: SelectionConfig = DEFAULT_CONFIG) -> None:
        super().__init__()
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
        1/(1-m) times is what makes momentum unstable (see `elastic.torch.exchange`).
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

