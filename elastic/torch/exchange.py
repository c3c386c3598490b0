"""Gradient exchanges other than Horovod's dense allreduce: top-k and bounded staleness.

`DistributedOptimizer` uses one of these when given `compression=hvd.Compression.topk(...)`
or `staleness=S > 0`. All gradients are laid out in one flat buffer: parameters of at
least `min_sparse_numel` values first (the part that is sparsified), small ones (biases,
norms) after it, sent dense. A member's message is self-delimiting payloads (see
`elastic.codecs.wire`), so one allgather carries everything and every rank decodes in rank
order into one dense buffer.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from elastic.codecs.aggregate import allreduce_bytes
from elastic.codecs.compression import TopKCompression
from elastic.codecs.exchange import average_payloads
from elastic.codecs.payload import PayloadCodec
from elastic.codecs.stats import RoundStats
from elastic.staleness import rounds as core_rounds
from elastic.staleness.decide import NormCheck, inverse_staleness
from elastic.staleness.rounds import RoundResult

if TYPE_CHECKING:
    from elastic.core.runtime import GenerationRuntime

logger = logging.getLogger(__name__)

class FlatLayout:
    """Where each parameter's gradient lives in the flat buffer (large ones first)."""

    def __init__(self, params: Sequence[torch.Tensor], min_sparse_numel: int) -> None:
        large = [p for p in params if p.numel() >= min_sparse_numel]
        small = [p for p in params if p.numel() < min_sparse_numel]
        self.params = large + small
        self.sparse_numel = sum(p.numel() for p in large)
        self.numel = self.sparse_numel + sum(p.numel() for p in small)
        if self.params:
            dtypes = {p.dtype for p in self.params}
            if len(dtypes) != 1:
                raise ValueError(f"top-k and staleness need one gradient dtype, got {dtypes}")
            self.dtype = self.params[0].dtype
            self.device = self.params[0].device
        else:
            self.dtype, self.device = torch.float32, torch.device("cpu")

    def gather(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """A flat copy of the gradients (zeros where a parameter has none), into `out`
        when given (reusing one buffer spares a large allocation and its page faults)."""
        grads = [p.grad for p in self.params]
        if out is None or out.numel() != self.numel or out.dtype != self.dtype \
                or out.device != self.device:
            out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        if grads and all(g is not None and not g.is_sparse and g.dtype == self.dtype
                         for g in grads):
            return torch.cat([g.reshape(-1) for g in grads], out=out)  # type: ignore[union-attr]
        offset = 0
        for p, grad in zip(self.params, grads):
            n = p.numel()
            if grad is None:
                out[offset:offset + n].zero_()
            else:
                grad = grad.to_dense() if grad.is_sparse else grad
                out[offset:offset + n].copy_(grad.reshape(-1))
            offset += n
        return out

    def scatter(self, flat: torch.Tensor, scale: float = 1.0) -> None:
        """Write `scale * flat` back into the parameters' gradients."""
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                view = flat[offset:offset + n].view_as(p)
                if p.grad is None or p.grad.is_sparse:
                    p.grad = view * scale if scale != 1.0 else view.clone()
                elif scale != 1.0:
                    torch.mul(view, scale, out=p.grad)
                else:
                    p.grad.copy_(view)
                offset += n


def momentum_from(optimizer: torch.optim.Optimizer, spec: TopKCompression) -> float:
    """Move SGD's momentum into the compressor (DGC's momentum correction)."""
    if not spec.momentum_correction:
        return 0.0
    groups = optimizer.param_groups
    momenta = {float(g.get("momentum", 0.0) or 0.0) for g in groups}
    if momenta == {0.0}:
        return 0.0
    if len(momenta) != 1:
        raise ValueError(f"momentum correction needs one momentum for all param groups, got "
                         f"{sorted(momenta)}; pass momentum_correction=False")
    if any(g.get("nesterov") for g in groups):
        raise ValueError("momentum correction does not support nesterov=True; pass "
                         "momentum_correction=False to Compression.topk")
    momentum = momenta.pop()
    for group in groups:
        group["momentum"] = 0.0
    logger.info("top-k: momentum %.3g moved from the optimizer into the compressor "
                "(momentum correction)", momentum)
    return momentum


class StalenessRounds(core_rounds.StalenessRounds):
    """`hvd.StalenessRounds`: rounds of one flat gradient buffer in the current generation
    (`elastic.staleness.rounds.StalenessRounds`, whose arguments it takes)."""

    def __init__(self, numel: int, staleness: int, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("runtime") is None:
            from elastic.torch.runtime import runtime

            kwargs["runtime"] = runtime()
        super().__init__(numel, staleness, *args, **kwargs)


class StaleExchange:
    """Bounded-staleness steps: submit this step's gradient, apply finished rounds in order."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                 spec: TopKCompression | None, staleness: int, round_deadline: float | None,
                 weight: Callable[[int], float] | None, process_set: Any,
                 on_round: Callable[[RoundResult], None] | None = None,
                 fp16_dense: bool = False, norm_check: NormCheck | None = None) -> None:
        if process_set.process_set_id not in (0, None):
            raise ValueError("staleness > 0 runs on the global process set only")
        self.layout = FlatLayout(params, spec.min_sparse_numel if spec else 1 << 62)
        self.compressor = spec.build(momentum_from(optimizer, spec)) if spec else None
        self._groups = optimizer.param_groups
        self.staleness = staleness
        self.round_deadline = round_deadline
        self.weight = weight or inverse_staleness
        self.on_round = on_round
        self.norm_check = norm_check
        self.fp16_dense = fp16_dense  # Compression.fp16: dense values travel as float16
        self.rounds: core_rounds.StalenessRounds | None = None
        self._flat: torch.Tensor | None = None
        self.applied = 0
        self.totals = RoundStats()  # of the generations before the current rounds
        self._strikes: Counter = Counter()  # per node, over all generations
        self.on_start: Callable[[], None] | None = None  # called when new rounds start

    def _ensure_rounds(self, runtime: GenerationRuntime) -> core_rounds.StalenessRounds:
        generation = runtime.generation.id
        if self.rounds is not None and self.rounds.generation == generation:
            return self.rounds
        if self.rounds is not None:
            self.rounds.close()
            self.totals = self.totals.plus(self.rounds.stats)
        codec = PayloadCodec(self.layout, self.compressor, runtime.size,
                             fp16_dense=self.fp16_dense)
        on_round = self.on_round or _round_reporter(runtime)
        self.rounds = core_rounds.StalenessRounds(
            self.layout.numel, self.staleness, codec=codec, round_deadline=self.round_deadline,
            weight=self.weight, dtype=self.layout.dtype, on_round=on_round,
            on_strikes=_evictor(runtime), strikes=self._strikes, norm_check=self.norm_check,
            runtime=runtime)
        self.applied = 0
        if self.on_start is not None:
            self.on_start()
        return self.rounds

    def step(self, runtime: GenerationRuntime, samples: int, apply: Callable[[], None]) -> None:
        """Submit the current gradients to the rounds of `runtime`'s generation; run
        `apply()` once per finished aggregate."""
        rounds = self._ensure_rounds(runtime)
        if rounds.codec.encodes_each:  # encoded in submit(): one buffer serves every step
            self._flat = self.layout.gather(self._flat)
            rounds.submit(self._flat, samples, self.applied, copy=False)
        else:
            rounds.submit(self.layout.gather(), samples, self.applied, copy=False)
        self._apply(rounds.results(block=False), apply)
        while rounds.outstanding > self.staleness:
            self._apply(rounds.results(block=True, timeout=1.0), apply)
        rounds.released()

    def _apply(self, results: list[RoundResult], apply: Callable[[], None]) -> None:
        damped = self._damped()
        adaptive = self._adaptive()
        for result in results:
            self._settle(result, damped)
            if result.aggregate is not None:
                # One step per member step the aggregate stands for (a round that caught
                # two gradients of each member takes two steps' length), and with the
                # optimizer's momentum a staleness-aware step: a round of gradients s
                # aggregates old steps w(s) as far as a fresh one (the aggregate is their
                # average).
                factor = result.steps * (result.freshness if damped else 1.0)
                if adaptive:  # Adam and kin ignore a gradient's scale: scale the step
                    self.layout.scatter(result.aggregate)
                    self._scaled_lr(factor, apply)
                else:  # SGD: scale what enters the momentum buffer and the step
                    self.layout.scatter(result.aggregate, factor)
                    apply()
                self.applied += 1
                if self.on_round is None and self.rounds is not None:  # nobody else holds it
                    self.rounds.recycle(result.aggregate)

    def _adaptive(self) -> bool:
        """Whether the optimizer normalises the gradient's scale away (Adam, AdamW, ...:
        param groups with `betas`), so a step is scaled through its learning rate."""
        return any("betas" in g for g in self._groups)

    def _scaled_lr(self, factor: float, apply: Callable[[], None]) -> None:
        """Run `apply()` with every group's learning rate times `factor`, then restore
        it (a scheduler sees its own values)."""
        if factor == 1.0:
            apply()
            return
        saved = [g.get("lr") for g in self._groups]
        try:
            for g, lr in zip(self._groups, saved):
                if lr is not None:
                    g["lr"] = lr * factor
            apply()
        finally:
            for g, lr in zip(self._groups, saved):
                if lr is not None:
                    g["lr"] = lr

    def _damped(self) -> bool:
        """Whether stale aggregates take a shorter step: with the optimizer's momentum
        (SGD's `momentum`, Adam's first beta). A gradient one aggregate old shrinks the
        steps for which heavy-ball momentum m is stable from 2(1+m)/h to (1-m)/h on a
        curvature h (0.1/h against 3.8/h for m=0.9), but only from 2/h to 1/h without
        momentum, where a shorter step would only slow training down. The compressor's
        momentum (top-k's momentum correction) is damped where gradients enter it
        instead (`PayloadCodec.intake`): full steps, stale gradients repeated less."""
        return any(float(g.get("momentum", 0.0) or 0.0) > 0
                   or float((g.get("betas") or (0.0,))[0]) > 0 for g in self._groups)

    def _settle(self, result: RoundResult, damped: bool) -> None:
        """Tell the codec what became of this member's own contributions in the round."""
        rounds = self.rounds
        if rounds is None or not isinstance(rounds.codec, PayloadCodec) \
                or rounds.codec.compressor is None:
            return
        for c in result.contributions:
            if c.rank != rounds.rank:
                continue
            if c.accepted:
                applied = c.weight if damped else 1.0
                rounds.codec.intake = c.weight  # w(s) of an accepted one
            elif c.staleness > self.staleness:
                applied = 0.0  # dropped unapplied: all of it goes back
            else:
                applied = 1.0  # rejected: never fed back
            rounds.codec.settle(applied)

    def finish(self, apply: Callable[[], None]) -> None:
        """End the rounds on every member together and apply what is left."""
        if self.rounds is not None:
            self._apply(self.rounds.finish(), apply)
            self.totals = self.totals.plus(self.rounds.stats)
            self.rounds = None

    @property
    def stats(self) -> RoundStats:
        """Counts over every generation this optimizer ran in."""
        return self.totals.plus(self.rounds.stats) if self.rounds is not None else self.totals


def _round_reporter(runtime: GenerationRuntime) -> Callable[[RoundResult], None] | None:
    """Report every staleness round to the coordinator, when there is one."""
    from elastic.credit.reports import report_from_round

    sink = runtime.reports
    if sink is None:
        return None
    members, job = runtime.members, runtime.job
    return lambda result: sink.record(report_from_round(job, members, result))


def report_synchronous_step(samples: int | None, process_set: Any) -> None:
    """Synchronous steps: report the round to the coordinator, when there is one.

    The allreduce that just completed is itself the proof that every member took part.
    With `samples=None` (the default, and what every Horovod script passes) each member
    counts one sample per step and nothing more is exchanged; with explicit counts, one
    allgather shares them (pass `samples` on every rank or on none).
    """
    from elastic.torch.collectives import allgather
    from elastic.torch.runtime import runtime

    current = runtime()
    sink = current.reports
    if sink is None or process_set.process_set_id not in (0, None):
        return
    members = current.members
    if samples is None:
        counts = [1] * len(members)
    else:
        counts = allgather(torch.tensor([int(samples)]), name="horde.samples").tolist()
    sink.record_step(current.generation.id, members, counts)


def _evictor(runtime: GenerationRuntime) -> Callable[[str, str], None] | None:
    """Rank 0 blacklists a node whose contributions were rejected too often."""
    blacklist = runtime.blacklist
    if blacklist is None:
        return None
    return lambda node, reason: blacklist(
        node, f"too many rejected contributions (last: {reason})")


class TopKAllreduce:
    """Top-k sparsified averaging of named tensors, for users of `hvd.allreduce`.

        topk = hvd.TopKAllreduce(hvd.Compression.topk(0.01))
        averaged = topk(tensor, name="layer1.grad")   # same call on every rank

    Keeps a residual (error feedback) per name, so what is not sent this call is sent
    later. Every rank must call it with the same names in the same order.
    """

    def __init__(self, compression: TopKCompression, process_set: Any = None) -> None:
        from elastic.torch.runtime import global_process_set

        if not isinstance(compression, TopKCompression):
            raise TypeError("TopKAllreduce needs hvd.Compression.topk(...), got "
                            f"{compression!r}")
        self.compression = compression
        self.compressor = compression.build()
        self.process_set = process_set if process_set is not None else global_process_set
        self.steps: dict[str, int] = {}
        self.stats = RoundStats(residual=self.compressor.residual_norm)

    def __call__(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """The average over ranks of `tensor` as top-k with error feedback transmits it."""
        from elastic.torch.runtime import process_set_id, runtime

        size = self.process_set.size() or 1
        step = self.steps.get(name, 0)
        self.steps[name] = step + 1
        flat = tensor.detach().reshape(-1)
        payload = self.compressor.compress(name, flat, step, world_size=size)
        dense = self.compressor.prefers_dense(flat.numel(), step, size)
        out, sent, rejected = average_payloads(
            runtime().engine, [payload], [flat.numel()], flat, size, f"horde.topk.{name}",
            process_set_id(self.process_set),
            dense_wire=self.compressor.value_dtype if dense else None)
        self.stats.rejected += len(rejected)
        self.stats.rounds += 1
        self.stats.bytes_sent += sent
        self.stats.dense_bytes += int(allreduce_bytes(flat.numel(), size, flat.element_size()))
        self.stats.last_density = self.compressor.density(step)
        return out.view_as(tensor)
