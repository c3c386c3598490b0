"""Synchronous top-k (staleness 0) over the engine: one allgather of payloads per step.

Framework-neutral: gradients come and go through a `GradientLayout` (a frontend's view
of its parameters as one flat torch CPU buffer, large parameters first), collectives go
to the engine of the generation's runtime. A member's message is self-delimiting
payloads (`elastic.codecs.wire`), so one allgather carries everything and every rank
decodes in rank order into one dense buffer.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Protocol

import torch

from elastic.codecs.aggregate import allreduce_bytes
from elastic.codecs.payload import PayloadCodec
from elastic.codecs.registry import add_into
from elastic.codecs.robust import MultiKrum
from elastic.codecs.stats import RoundStats
from elastic.codecs.topk import TopKCompressor
from elastic.codecs.wire import (
    HEADER_BYTES,
    SparsePayload,
    SparsePayloadError,
    all_finite,
    pack_payloads,
    unpack_payloads,
)
from elastic.core.engine import Kind, ReduceOp, Request

if TYPE_CHECKING:
    from elastic.core.engine import CollectiveEngine
    from elastic.core.runtime import GenerationRuntime

logger = logging.getLogger(__name__)

__all__ = ["GradientLayout", "SyncSparseExchange", "average_payloads"]

#: Log the communication summary every this many exchanges.
LOG_EVERY = 100


class GradientLayout(Protocol):
    """A frontend's gradients as one flat buffer: the first `sparse_numel` of `numel`
    values are sparsified, the rest (small parameters) sent dense."""

    sparse_numel: int
    numel: int
    dtype: torch.dtype

    def gather(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The gradients, flat (into `out` when it fits)."""

    def scatter(self, flat: torch.Tensor, scale: float = 1.0) -> None:
        """Write `scale * flat` back as the gradients."""


class SyncSparseExchange:
    """Synchronous top-k: per step one allgather of every member's payloads, or one dense
    allreduce on steps that send every buffer dense."""

    def __init__(self, layout: GradientLayout, compressor: TopKCompressor,
                 robust: int | None = None, nonfinite_skips: bool = False) -> None:
        """`robust`: F > 0 leaves the F gradients furthest from the others out of every
        average (`elastic.codecs.robust`); None: HORDE_ROBUST_AGGREGATION's value.
        `nonfinite_skips`: a member's NaN/Inf values make the whole average NaN (the caller
        skips that step on every rank, as a dense one) instead of being left out (unless
        HORDE_MAX_NONFINITE_STEPS=0)."""
        self.layout = layout
        self.nonfinite_skips = nonfinite_skips
        self.robust = robust
        self._krum: tuple[int, MultiKrum] | None = None  # (generation, its suspicions)
        self.compressor = compressor
        self.step = 0
        self.stats = RoundStats(residual=self.compressor.residual_norm)
        self._flat: torch.Tensor | None = None  # the gradients, then their average

    def reduce(self, runtime: GenerationRuntime, size: int, process_set_id: int = 0) -> None:
        """Replace every gradient by the average of the `size` members' sparsified
        gradients (members of process set `process_set_id`) over `runtime`'s generation."""
        engine = runtime.engine
        codec = PayloadCodec(self.layout, self.compressor, size)
        flat = self._flat = self.layout.gather(self._flat)
        # HORDE_MAX_NONFINITE_STEPS=0 never skips: a NaN member is then left out.
        skips = self.nonfinite_skips and runtime.settings.max_nonfinite_steps > 0
        skipped_before = self.compressor.skipped_steps
        payloads = codec.payloads(flat, self.step)
        if skips and self.layout.sparse_numel and \
                self.compressor.skipped_steps != skipped_before:
            # The compressor sends nothing for a NaN/Inf gradient (its residual must not
            # take it in); the others would average without this rank and apply the step.
            # One NaN entry tells every member, so every rank skips the step alike.
            payloads[0] = _nonfinite_marker(payloads[0])
        expected = [s for s in (self.layout.sparse_numel,
                                self.layout.numel - self.layout.sparse_numel) if s]
        dense = self.compressor.prefers_dense(self.layout.sparse_numel, self.step, size)
        # The payloads no longer refer to `flat` (the compressor keeps its own residual,
        # dense parts are copies), so the average can overwrite it.
        out, sent, rejected = average_payloads(
            engine, payloads, expected, flat, size, "horde.topk", process_set_id,
            dense_wire=self.compressor.value_dtype if dense else None, out=flat,
            robust=self._robust(runtime), stats=self.stats,
            nonfinite_skips=skips)
        self.layout.scatter(out)
        self.stats.rounds += 1
        self.stats.bytes_sent += sent
        self.stats.dense_bytes += int(allreduce_bytes(flat.numel(), size, flat.element_size()))
        self.stats.last_density = self.compressor.density(self.step)
        self.stats.accepted += size - len(rejected)
        self.stats.staleness[0] += size - len(rejected)
        self.stats.rejected += len(rejected)
        self.step += 1
        if self.step % LOG_EVERY == 0:
            logger.info("top-k: %s", self.stats.as_dict())

    def _robust(self, runtime: GenerationRuntime) -> MultiKrum | None:
        """The robust rule of this generation (suspicions start afresh with each one: a
        newcomer has none of the past, and every member must judge alike), or None."""
        f = self.robust if self.robust is not None else runtime.settings.robust_aggregation
        if f <= 0:
            return None
        generation = runtime.generation.id
        if self._krum is None or self._krum[0] != generation:
            self._krum = (generation, MultiKrum(f))
        return self._krum[1]


def average_payloads(engine: CollectiveEngine, payloads: list[SparsePayload],
                     numels: list[int], like: torch.Tensor, size: int, name: str,
                     process_set_id: int = 0, dense_wire: torch.dtype | None = None,
                     out: torch.Tensor | None = None, robust: MultiKrum | None = None,
                     stats: RoundStats | None = None, nonfinite_skips: bool = False
                     ) -> tuple[torch.Tensor, int, list[int]]:
    """The average over ranks of every rank's `payloads` (one per buffer, together
    `like.numel()` values), the bytes this rank sent for it, and the ranks whose
    payloads were rejected (indices out of range or not ascending, NaN/Inf values: left
    out of the average on every member alike).

    `dense_wire`: this step is dense on every rank (warm-up, density above the
    allgather's break-even; the same decision everywhere): one ring allreduce of the
    values in that dtype carries it, as Horovod's would. Otherwise one allgather of the
    self-delimiting payloads, added in rank order into one buffer: `out` when given (a
    buffer like `like`, overwritten), else a new one.

    `robust`: decode each rank's payloads on its own and average only those multi-Krum
    keeps (`elastic.codecs.robust`; `stats.robust_dropped` counts the others);
    dense steps then travel by allgather too (an allreduce never shows a rank's values).

    `nonfinite_skips`: a well-formed payload with NaN/Inf values (a diverged loss, bad
    data: not a sign of a hostile member) is not rejected but makes the whole average
    NaN, so the caller skips the step on every rank and counts it, as a dense step whose
    allreduce holds NaN; malformed payloads are still rejected.
    """
    if dense_wire is not None and robust is None:
        values = torch.cat([_dense_values(p, dense_wire) for p in payloads])
        (average,) = engine.submit(Request(
            Kind.ALLREDUCE, [values], name=f"{name}.dense", op=ReduceOp.Average,
            process_set_id=process_set_id)).result()
        sent = int(allreduce_bytes(values.numel(), size, values.element_size()))
        return average.to(like.dtype), sent, []
    message = pack_payloads(payloads)
    # At most 4-byte indices and 8-byte values per entry and a header per payload from an
    # honest member; a peer announcing more is refused before anything is allocated.
    honest = sum(HEADER_BYTES + 8 + 12 * n for n in numels)
    gather = Request(Kind.ALLGATHER, [message], name=name, process_set_id=process_set_id,
                     honest_part_bytes=honest)
    (gathered,) = engine.submit(gather).result()
    lengths = gather.splits  # the bytes each rank sent (set by the engine)
    assert lengths is not None
    out = torch.zeros_like(like) if out is None else out.zero_()
    parts = []
    offset = 0
    for n in numels:
        parts.append(out[offset:offset + n])
        offset += n
    offset, accepted, rejected, nonfinite = 0, 0, [], []
    separate: list[torch.Tensor] = []  # robust: each accepted rank's gradient on its own
    separate_ranks: list[int] = []
    for rank in range(size):
        # Each rank's own bytes: a peer's malformed header (a wrong size, bad magic) must
        # cost that rank its gradient, not fail the step or shift the next rank's bytes.
        mine = gathered[offset:offset + lengths[rank]]
        offset += lengths[rank]
        try:
            received, used = unpack_payloads(mine, numels=numels, validate=False)
            if used != mine.numel():
                raise SparsePayloadError(
                    f"{mine.numel() - used} bytes follow its payloads (sent {mine.numel()})")
            for payload in received:
                payload.validate(values=False)
            if nonfinite_skips and not all(all_finite(p.values) for p in received):
                nonfinite.append(rank)
                continue
            for payload in received:
                payload.validate()
        except SparsePayloadError as exc:
            # Every member sees the same bytes, so every member rejects the same rank.
            logger.warning("top-k: rejected the gradient of rank %d: %s", rank, exc)
            rejected.append(rank)
            continue
        if robust is not None:
            own = torch.zeros_like(out)
            offset_own = 0
            for payload, n in zip(received, numels):
                add_into(payload, own[offset_own:offset_own + n], 1.0)
                offset_own += n
            separate.append(own)
            separate_ranks.append(rank)
        else:
            for payload, part in zip(received, parts):
                add_into(payload, part, 1.0)
        accepted += 1
    if robust is not None:
        kept = robust.keep(separate, separate_ranks)
        for index in kept:  # rank order: the same sum on every member
            out.add_(separate[index])
        if stats is not None:
            stats.robust_dropped += len(separate) - len(kept)
            stats.robust_dropped_ranks.update(
                r for i, r in enumerate(separate_ranks) if i not in kept)
        accepted = len(kept)
    sent = int(message.numel()) * (size - 1)
    if nonfinite:
        # Every member sees the same bytes, so every member skips this step.
        logger.warning("top-k: the gradient of rank(s) %s holds NaN/Inf (a diverged loss or "
                       "bad data, not counted against them): the step is skipped on every "
                       "rank", nonfinite)
        return out.fill_(math.nan), sent, rejected
    return out.div_(max(accepted, 1)), sent, rejected


def _nonfinite_marker(empty: SparsePayload) -> SparsePayload:
    """A well-formed payload of one NaN value (at index 0) in place of the empty one a
    compressor sends for a non-finite gradient: peers then see that this rank's gradient
    was non-finite (`average_payloads(nonfinite_skips=True)`), in sparse and dense steps."""
    indices = torch.zeros(1, dtype=torch.int32, device=empty.values.device)
    values = torch.full((1,), math.nan, dtype=empty.values.dtype, device=empty.values.device)
    return SparsePayload(indices, values, empty.numel, empty.dtype, empty.tag)


def _dense_values(payload: SparsePayload, dtype: torch.dtype) -> torch.Tensor:
    """A payload's values as a dense vector (zeros where a sparse one sends nothing)."""
    if payload.indices is None:
        return payload.values.reshape(-1).to(dtype)
    out = torch.zeros(payload.numel, dtype=dtype, device=payload.values.device)
    out.index_copy_(0, payload.indices.long(), payload.values.to(dtype))
    return out
