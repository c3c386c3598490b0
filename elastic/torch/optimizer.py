"""Horovod's `DistributedOptimizer`: averages gradients over the ranks before each step.

Gloo pairs collectives by the order in which ranks issue them, not by name, and autograd
may finish gradients in different orders on different ranks. So gradients are reduced in
*buckets* with a fixed order (reverse registration order, as DDP does, or the caller's
`groups`): a bucket is launched, as one fused allreduce, once all its gradients are ready
and every earlier bucket has been launched; `synchronize()` launches whatever is left.
"""

from __future__ import annotations

import itertools
import logging
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from elastic.codecs.compression import (
    Compression,
    Compressor,
    FP16Compressor,
    NoneCompressor,
    TopKCompression,
)
from elastic.codecs.exchange import SyncSparseExchange
from elastic.core.engine import GradientStep, ReduceOp
from elastic.core.gradients import DTYPES
from elastic.errors import NonFiniteGradientError
from elastic.staleness.decide import NormCheck
from elastic.staleness.exchange import StaleExchange
from elastic.torch import runtime
from elastic.torch.adasum_optimizer import (
    ZERO_GRAD_RACE,
    adasum_optimizer,
    on_grad_ready,
    remove_hooks,
)
from elastic.torch.collectives import (
    Adasum,
    Average,
    Sum,
    allreduce_async_,
    grouped_allreduce_async,
    sparse_allreduce_async,
    synchronize,
)
from elastic.torch.exchange import (
    FlatLayout,
    TorchStepper,
    momentum_from,
    report_synchronous_step,
)
from elastic.torch.runtime import ProcessSet, global_process_set, register_finisher

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_CAP_MB = 25.0


@dataclass
class _Launched:
    """The collectives of one bucket that are in flight."""

    dense: list[torch.Tensor] = field(default_factory=list)
    dense_ctx: list[Any] = field(default_factory=list)
    flat: torch.Tensor | None = None
    """The bucket's persistent buffer when its gradients were reduced in it."""
    views: list[torch.Tensor] = field(default_factory=list)
    """Views of `flat` shaped as the bucket's gradients."""
    work: Any = None
    """The bucket's allreduce on the gradient channel, when sent directly."""
    step: GradientStep | None = None
    """The step whose channel carries `work`."""
    index: int = -1
    was_sparse: list[bool] = field(default_factory=list)
    handle: int | None = None
    sparse: list[tuple[torch.Tensor, int]] = field(default_factory=list)


def parameter_names(named_parameters: Iterable[tuple[str, torch.Tensor]],
                    params: list[torch.Tensor]) -> dict[int, str]:
    """Names by parameter id, checked as Horovod checks them (tuples, unique, complete)."""
    named = list(named_parameters)
    if any(not isinstance(item, tuple) or len(item) != 2 for item in named):
        raise ValueError("named_parameters should be a sequence of (name, parameter) "
                         "tuples, usually produced by model.named_parameters()")
    seen: set[str] = set()
    dups = sorted({name for name, _ in named if name in seen or seen.add(name)})
    if dups:
        raise ValueError("Parameter names in named_parameters must be unique. Found "
                         f"duplicates: {', '.join(map(str, dups))}")
    known = {id(p) for _, p in named}
    unnamed = [p for p in params if id(p) not in known]
    if unnamed:
        raise ValueError("named_parameters was specified, but one or more model "
                         "parameters were not named. Python object ids: "
                         + ", ".join(str(id(p)) for p in unnamed))
    return {id(p): name for name, p in named}


def _split_evenly(items: list[torch.Tensor], parts: int) -> list[list[torch.Tensor]]:
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return [chunk for chunk in out if chunk]


class _DistributedOptimizer:
    """Mixin placed before the wrapped optimizer's class; see `DistributedOptimizer`."""

    # -- construction -----------------------------------------------------------------

    def _horde_setup(self, named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
                     compression: type[Compressor], backward_passes_per_step: int,
                     op: ReduceOp, gradient_predivide_factor: float,
                     groups: int | list[list[torch.Tensor]] | None, sparse_as_dense: bool,
                     process_set: ProcessSet, bucket_cap: int, staleness: int = 0,
                     round_deadline: float | None = None,
                     staleness_weight: Any = None, norm_check: NormCheck | None = None) -> None:
        self._compression = compression
        self._exchange: SyncSparseExchange | StaleExchange | None = None
        self.backward_passes_per_step = backward_passes_per_step
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.sparse_as_dense = sparse_as_dense
        self.process_set = process_set
        self._bucket_cap = bucket_cap
        self._groups = groups
        self._lock = threading.RLock()
        self._synchronized = False
        self._should_synchronize = True
        self._names: dict[int, str] = {}
        self._order: dict[int, int] = {}
        self._buckets: list[list[torch.Tensor]] = []
        self._bucket_of: dict[int, int] = {}
        self._hooks: list[Any] = []
        self._flats: dict[int, tuple[torch.Tensor, list[torch.Tensor], Any, torch.Tensor]] = {}
        self._steps = {"negotiated": 0, "direct": 0}
        self._serial = next(_serials)  # never reused (an id() can be, after collection)
        self._nonfinite_run = 0  # consecutive synchronous steps skipped as non-finite
        self._nonfinite_skipped = 0
        self._reset_progress()
        self._included()  # raises ValueError before hvd.init(), as Horovod does

        all_params = self._all_params()
        if named_parameters is not None:
            self._names = parameter_names(named_parameters, all_params)
        self._add_params(all_params)
        weakref.finalize(self, remove_hooks, self._hooks)
        sparse = isinstance(compression, TopKCompression)
        if staleness > 0:
            fp16 = isinstance(compression, FP16Compressor) or (
                isinstance(compression, type) and issubclass(compression, FP16Compressor))
            if self.process_set.process_set_id not in (0, None):
                raise ValueError("staleness > 0 runs on the global process set only")
            spec = compression if sparse else None
            self._exchange = StaleExchange(
                FlatLayout(all_params, spec.min_sparse_numel if spec else 1 << 62),
                spec.build(momentum_from(self, spec)) if spec else None, staleness,
                round_deadline, staleness_weight, fp16_dense=fp16, norm_check=norm_check)
            self._stepper = TorchStepper(self, self._inner_step)
            # Each new stream of rounds (a generation, an init after a shutdown) is ended
            # by hvd.shutdown(): in flight on one member is applied on all.
            self._exchange.on_start = lambda: register_finisher(self.finish)
        elif sparse:
            self._exchange = SyncSparseExchange(
                FlatLayout(all_params, compression.min_sparse_numel),
                compression.build(momentum_from(self, compression)),
                nonfinite_skips=True)  # step() skips a NaN average on every rank

    def _all_params(self) -> list[torch.Tensor]:
        params = self.param_groups  # type: ignore[attr-defined]
        return [p for group in params for p in group["params"]]

    def _add_params(self, params: list[torch.Tensor]) -> None:
        """Give new parameters names, buckets (appended after existing ones) and hooks."""
        positions = {id(q): (gi, pi)
                     for gi, group in enumerate(self.param_groups)  # type: ignore[attr-defined]
                     for pi, q in enumerate(group["params"])}
        for p in params:
            if id(p) in self._order:
                continue
            self._order[id(p)] = len(self._order)
            if id(p) not in self._names:
                gi, pi = positions.get(id(p), (-1, self._order[id(p)]))
                self._names[id(p)] = f"allreduce.noname.{gi}.{pi}"
        fresh = [p for p in params if p.requires_grad and id(p) not in self._bucket_of]
        if not fresh:
            return
        for bucket in self._make_buckets(fresh):
            index = len(self._buckets)
            self._buckets.append(bucket)
            for p in bucket:
                self._bucket_of[id(p)] = index
        self._missing.extend(len(b) for b in self._buckets[len(self._missing):])
        ref = weakref.ref(self)
        for p in fresh:
            self._delay[id(p)] = self.backward_passes_per_step
            self._hooks.append(p.register_post_accumulate_grad_hook(
                lambda param, ref=ref: on_grad_ready(ref, param)))

    def _make_buckets(self, params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Fixed, rank-independent bucket order: gradients that are ready first go first."""
        groups = self._groups
        backwards = sorted(params, key=lambda p: -self._order[id(p)])
        if isinstance(groups, list):
            wanted = {id(p) for p in params}
            grouped = [[p for p in g if id(p) in wanted] for g in groups]
            taken = {id(p) for g in grouped for p in g}
            buckets = [g for g in grouped if g] + [[p] for p in params if id(p) not in taken]
            return sorted(buckets, key=lambda b: -min(self._order[id(p)] for p in b))
        if isinstance(groups, int) and groups > 0:
            return _split_evenly(backwards, groups)
        buckets: list[list[torch.Tensor]] = []
        current: list[torch.Tensor] = []
        nbytes = 0
        for p in backwards:
            size = p.numel() * p.element_size()
            if current and (nbytes + size > self._bucket_cap or p.dtype != current[0].dtype
                            or p.device != current[0].device):
                buckets.append(current)
                current, nbytes = [], 0
            current.append(p)
            nbytes += size
        if current:
            buckets.append(current)
        return buckets

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group as torch does; its parameters are reduced like the others."""
        super().add_param_group(param_group)  # type: ignore[misc]
        if hasattr(self, "_bucket_of"):
            with self._lock:
                self._add_params(list(self.param_groups[-1]["params"]))  # type: ignore[attr-defined]

    # -- progress of one step ---------------------------------------------------------

    def _reset_progress(self) -> None:
        self._delay = {pid: self.backward_passes_per_step for pid in self._bucket_of}
        self._missing = [len(b) for b in self._buckets]
        self._next_bucket = 0
        self._inflight: list[_Launched] = []
        self._touched = False
        self._step: GradientStep | None = None

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Change how many backward passes are accumulated before gradients are reduced."""
        with self._lock:
            self.backward_passes_per_step = passes
            for pid in self._delay:
                self._delay[pid] = passes
            self._missing = [len(b) if i >= self._next_bucket else 0
                             for i, b in enumerate(self._buckets)]

    def _included(self) -> bool:
        return bool(self.process_set.included())

    def _grad_ready(self, p: torch.Tensor) -> None:
        """Autograd hook: count a backward pass for `p`; launch buckets that became ready."""
        with self._lock:
            if not self._included() or id(p) not in self._bucket_of:
                return
            if self._delay[id(p)] <= 0:
                raise AssertionError(
                    "Gradients were computed more than backward_passes_per_step times before "
                    "call to step(). Increase backward_passes_per_step to accumulate gradients "
                    "locally.")
            self._touched = True
            self._delay[id(p)] -= 1
            if self._delay[id(p)] == 0:
                self._missing[self._bucket_of[id(p)]] -= 1
                while (self._next_bucket < len(self._buckets)
                       and self._missing[self._next_bucket] == 0):
                    self._launch(self._next_bucket)
                    self._next_bucket += 1

    def _begin_step(self) -> None:
        """At the first bucket of a step: direct or negotiated, the same on every rank.
        Only plain dense buckets of the global set may use the gradient channel."""
        if self.process_set.process_set_id not in (0, None) or self._exchange is not None \
                or self._compression is not NoneCompressor \
                or self.op not in (ReduceOp.Average, ReduceOp.Sum):
            self._step = None
            return
        self._step = runtime.runtime().engine.gradient_step(self._serial)

    def _direct(self) -> bool:
        """Whether this step's buckets go directly on the gradient channel."""
        return self._step is not None and self._step.direct

    def _launch(self, index: int) -> None:
        if not self._inflight:
            self._begin_step()
        params = [p for p in self._buckets[index] if p.requires_grad or p.grad is not None]
        entry = _Launched()
        self._inflight.append(entry)
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p.detach())
        if (self.process_set.size() or 1) == 1 or self._exchange is not None:
            return  # nothing to combine here (one rank), or the exchange does it at step
        name = self._names[id(params[0])]
        compressed = []
        for p in params:
            grad = p.grad
            if grad.is_sparse and not self.sparse_as_dense:
                handle = sparse_allreduce_async(
                    grad.coalesce(), name=f"{self._names[id(p)]}.sparse",
                    op=Average if self.op == Average else Sum, process_set=self.process_set)
                entry.sparse.append((p, handle))
                continue
            entry.was_sparse.append(grad.is_sparse and not self._direct())
            if grad.is_sparse:
                grad = grad.to_dense()
            tensor, ctx = self._compression.compress(grad)
            entry.dense.append(p)
            entry.dense_ctx.append(ctx)
            compressed.append(tensor)
        if compressed:
            if self.op == Average:
                prescale = 1.0 / self.gradient_predivide_factor
                postscale = self.gradient_predivide_factor
            else:
                prescale = postscale = 1.0
            step = self._step if self._direct() else None
            dtype = compressed[0].dtype
            if step is not None and (dtype not in DTYPES or any(
                    t.dtype != dtype or t.device.type != "cpu" for t in compressed)):
                # The model changed dtype or device since the channel was armed (alike on
                # every rank): this bucket, and the next steps, go through negotiation.
                step.fall_back()
                step = None
            filled = self._fill_flat(index, compressed, step.tail if step else 0)
            if step is not None and filled is not None:
                entry.flat, entry.views = filled
                entry.step, entry.index = step, index
                if prescale != 1.0:
                    entry.flat[:entry.flat.numel() - step.tail].mul_(prescale)
                entry.work = step.start(entry.flat, index)
            elif filled is not None:
                entry.flat, entry.views = filled
                flat = entry.flat
                entry.handle = allreduce_async_(
                    flat, name=name, op=self.op, prescale_factor=prescale,
                    postscale_factor=postscale, process_set=self.process_set)
            else:
                entry.handle = grouped_allreduce_async(
                    compressed, name=name, op=self.op, prescale_factor=prescale,
                    postscale_factor=postscale, process_set=self.process_set)

    def _fill_flat(self, index: int, tensors: list[torch.Tensor], tail: int = 0
                   ) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """Copy a bucket's gradients into its persistent flat buffer (allocated once, as
        DDP's buckets are): no fresh 25 MB allocation and page faults every step, and the
        allreduce runs in place. `tail` extra elements follow the gradients (the gradient
        channel's). Returns the buffer and its views shaped as `tensors`; None when the
        gradients differ in dtype or device."""
        first = tensors[0]
        if any(t.dtype != first.dtype or t.device != first.device for t in tensors):
            return None
        shapes = [t.shape for t in tensors]
        cached = self._flats.get(index)
        if cached is None or cached[2] != (shapes, tail, first.dtype, first.device):
            numel = sum(t.numel() for t in tensors)
            flat = torch.empty(numel + tail, dtype=first.dtype, device=first.device)
            views, offset = [], 0
            for shape in shapes:
                views.append(flat[offset:offset + shape.numel()].view(shape))
                offset += shape.numel()
            cached = self._flats[index] = (flat if tail else flat[:numel], views,
                                           (shapes, tail, first.dtype, first.device),
                                           flat[:numel])
        flat, views, _key, data = cached
        torch.cat([t.detach().reshape(-1) for t in tensors], out=data)  # faster than foreach
        return flat, views

    def _finish(self, entry: _Launched) -> None:
        if entry.work is not None:
            self._finish_direct(entry)
        if entry.handle is not None:
            outputs = synchronize(entry.handle)
            entry.handle = None
            if entry.flat is not None:
                outputs = entry.views
            with torch.no_grad():
                for p, out, ctx, was_sparse in zip(entry.dense, outputs, entry.dense_ctx,
                                                   entry.was_sparse):
                    result = self._compression.decompress(out, ctx)
                    if was_sparse:
                        p.grad = result.to_sparse()
                    else:
                        p.grad.copy_(result)
        while entry.sparse:
            p, handle = entry.sparse.pop(0)
            p.grad = synchronize(handle).coalesce()

    def _finish_direct(self, entry: _Launched) -> None:
        step, work = entry.step, entry.work
        assert step is not None and entry.flat is not None
        entry.work = None
        count = step.finish(work, entry.flat, entry.index)
        factor = 1.0
        if self.op == Average:
            factor = self.gradient_predivide_factor / count
        with torch.no_grad():
            for p, view in zip(entry.dense, entry.views):
                if p.grad.is_sparse:
                    p.grad = view * factor
                elif factor != 1.0:
                    torch.mul(view, factor, out=p.grad)  # scale and copy in one pass
                else:
                    p.grad.copy_(view)

    def _after_step(self, inflight: list[_Launched]) -> None:
        """Count the step; after a complete negotiated step without joined ranks, send the
        next ones directly on the gradient channel (`elastic.core.gradients`)."""
        launched = [e for e in inflight if e.dense or e.sparse]
        step = self._step
        if self._direct():  # began direct; a bucket may have fallen back
            direct = all(e.step is not None for e in launched)
            self._steps["direct" if direct else "negotiated"] += 1
            return
        self._steps["negotiated"] += 1
        if step is None or not launched or any(
                e.flat is None or e.sparse or any(e.was_sparse) or e.flat.device.type != "cpu"
                or e.flat.dtype not in DTYPES for e in launched):
            return
        step.complete([(e.flat.numel(), e.flat.dtype) for e in launched])

    # -- Horovod's public methods -----------------------------------------------------

    def synchronize(self) -> None:
        """Finish reducing every gradient (launching any not yet launched) into `p.grad`.

        With staleness: apply every aggregate in flight, on every member together (as
        `finish()`), so parameters are identical; this step's gradients stay in `p.grad`.
        """
        if isinstance(self._exchange, StaleExchange):
            self.finish()
            self._synchronized = True
            return
        if not self._included():
            self._synchronized = True
            return
        error: BaseException | None = None
        with self._lock:
            try:
                while self._next_bucket < len(self._buckets):
                    self._launch(self._next_bucket)
                    self._next_bucket += 1
            except BaseException as exc:  # noqa: BLE001 - drain what was launched, then raise
                error = exc
            inflight, self._inflight = self._inflight, []
        try:
            for entry in inflight:
                if error is not None:
                    _drain(entry)
                    continue
                try:
                    self._finish(entry)
                except BaseException as exc:  # noqa: BLE001 - drain the rest, raise the first
                    error = exc
                    _drain(entry)
            if error is None and inflight and (self.process_set.size() or 1) > 1:
                self._after_step(inflight)
        finally:
            with self._lock:
                self._reset_progress()
        if error is not None:
            raise error
        size = self.process_set.size() or 1
        if isinstance(self._exchange, SyncSparseExchange) and size > 1:
            self._exchange.reduce(runtime.runtime(), size,
                                  runtime.process_set_id(self.process_set))
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Make `step()` skip synchronizing (after an explicit `synchronize()`)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure: Any = None, samples: int | None = None) -> Any:
        """Synchronize the gradients (unless skipped), then step the wrapped optimizer.

        With `staleness > 0` the gradient is handed to the rounds instead, and the wrapped
        optimizer steps once per aggregate that arrives; `samples` (a Horde addition,
        default 1) weighs this step's contribution in its round.
        """
        if isinstance(self._exchange, StaleExchange):
            loss = closure() if closure is not None else None
            with self._lock:
                self._reset_progress()
            self._exchange.step(runtime.runtime(), 1 if samples is None else int(samples),
                                self._stepper)
            return loss
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn(
                    "optimizer.step() called without optimizer.skip_synchronize() context "
                    "after optimizer.synchronize(). This can cause training slowdown. You may "
                    "want to consider using optimizer.skip_synchronize() context if you use "
                    "optimizer.synchronize() in your code.", stacklevel=2)
            self.synchronize()
            if self._skip_nonfinite():
                self._synchronized = False
                return None
            if self._included() and (self.process_set.size() or 1) > 1:
                report_synchronous_step(samples, self.process_set)
        elif self._skip_nonfinite():
            return None
        self._synchronized = False
        return super().step(closure)  # type: ignore[misc]

    def _skip_nonfinite(self) -> bool:
        """Whether to skip this step: its averaged gradient holds NaN/Inf. Every rank of the
        set holds the same average, so every rank skips the same steps (as mixed-precision
        grad scalers do); after HORDE_MAX_NONFINITE_STEPS in a row the job stops."""
        limit = runtime.settings().max_nonfinite_steps
        if not limit or not self._included():
            return False
        bad = _nonfinite_gradient(self._all_params())
        if bad is None:
            self._nonfinite_run = 0
            return False
        self._nonfinite_run += 1
        self._nonfinite_skipped += 1
        name = self._names.get(id(bad), "a parameter")
        if self._nonfinite_run >= limit:
            raise NonFiniteGradientError(
                f"the averaged gradient was non-finite (NaN/Inf) in {self._nonfinite_run} "
                f"steps in a row (last: of {name!r}); every rank skipped them and the job "
                "stops: a rank's loss or data went bad, or the learning rate is too high. "
                "Check the inputs and the learning rate, or resume from a checkpoint "
                f"(HORDE_MAX_NONFINITE_STEPS={limit} sets how many such steps are skipped "
                "first; 0 never skips)")
        logger.warning("skipped an optimizer step on every rank: the averaged gradient of %r "
                       "is non-finite (NaN/Inf), from some rank's loss or data (%d in a row; "
                       "the job stops at %d)", name, self._nonfinite_run, limit)
        return True

    def _inner_step(self) -> None:
        super().step()  # type: ignore[misc]

    def finish(self) -> None:
        """With staleness: end the rounds on every member together, applying what is left
        (the gradients of a backward pass not yet stepped stay in `p.grad`).

        Called by `hvd.shutdown()`, `synchronize()` and `state.commit()`; the next `step()`
        starts new rounds.
        """
        exchange = self._exchange
        if not isinstance(exchange, StaleExchange):
            return
        kept = exchange.layout.gather() if self._touched else None
        with self._lock:
            self._reset_progress()
        exchange.finish(self._stepper)  # applying the aggregates overwrites `p.grad`
        if kept is not None:
            exchange.layout.scatter(kept)

    def communication_stats(self) -> dict[str, Any]:
        """What communication cost and saved: bytes sent, density, residual norm, staleness
        histogram, dropped and rejected contributions (top-k and staleness modes)."""
        if self._exchange is None:
            return {"mode": "dense allreduce", "negotiated_steps": self._steps["negotiated"],
                    "direct_steps": self._steps["direct"],
                    "nonfinite_skipped": self._nonfinite_skipped}
        if isinstance(self._exchange, StaleExchange):
            return {"mode": "staleness", **self._exchange.stats.as_dict()}
        return {"mode": "top-k", **self._exchange.stats.as_dict(),
                "nonfinite_skipped": self._nonfinite_skipped}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients; refused while gradients are being reduced (a race)."""
        if self._touched or self._inflight:
            raise AssertionError(ZERO_GRAD_RACE)
        super().zero_grad(set_to_none=set_to_none)  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state as torch does and forget any half-finished gradient reduction."""
        with self._lock:
            for entry in self._inflight:
                _drain(entry)
            self._reset_progress()
        self._synchronized = False
        self._should_synchronize = True
        super().load_state_dict(state_dict)  # type: ignore[misc]


_serials = itertools.count()


def _nonfinite_gradient(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The first parameter whose gradient holds NaN/Inf, or None. One reduction per
    gradient and one host sync per device: a sum is NaN/Inf when any entry is (or when
    finite entries overflow it, which a step could not survive either)."""
    grads: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        values = g._values() if g.is_sparse else g
        dtype = torch.float32 if values.dtype in (torch.float16, torch.bfloat16) else None
        grads.setdefault(values.device, []).append((p, values.sum(dtype=dtype)))
    for sums in grads.values():
        finite = torch.isfinite(torch.stack([total for _, total in sums]))
        if not bool(finite.all()):
            return sums[int((~finite).nonzero()[0])][0]
    return None


def _drain(entry: _Launched) -> None:
    """Wait out a bucket's collectives whose result is no longer wanted."""
    if entry.work is not None and entry.step is not None:
        work, entry.work = entry.work, None
        try:
            entry.step.wait(work)
        except Exception:  # noqa: BLE001 - the first error is reported by the caller
            logger.debug("discarded a failed gradient allreduce", exc_info=True)
    handles = ([entry.handle] if entry.handle is not None else []) + [h for _, h in entry.sparse]
    entry.handle, entry.sparse = None, []
    for handle in handles:
        try:
            synchronize(handle)
        except Exception:  # noqa: BLE001 - the first error is reported by the caller
            logger.debug("discarded a failed gradient reduction", exc_info=True)


def _bucket_cap(bucket_cap_mb: float | None) -> int:
    """Bytes per bucket: the argument, else HOROVOD_FUSION_THRESHOLD, else the default."""
    if bucket_cap_mb is not None:
        return int(bucket_cap_mb * 2**20)
    threshold = runtime.settings().fusion_threshold
    if threshold is not None:
        return threshold
    return int(DEFAULT_BUCKET_CAP_MB * 2**20)


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                         compression: type[Compressor] = Compression.none,
                         backward_passes_per_step: int = 1, op: ReduceOp = Average,
                         gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups: int | Sequence[Sequence[torch.Tensor]] | None = None,
                         sparse_as_dense: bool = False,
                         process_set: ProcessSet = global_process_set,
                         bucket_cap_mb: float | None = None, staleness: int = 0,
                         round_deadline: float | None = None,
                         staleness_weight: Any = None,
                         norm_check: NormCheck | None = None) -> torch.optim.Optimizer:
    """Wrap `optimizer` so that `step()` applies gradients averaged over all ranks.

    The result is an instance of a subclass of `optimizer`'s class that shares its
    param groups, state and defaults. `bucket_cap_mb` (a Horde addition) caps the size
    of a fused allreduce when `groups` is not given (default: HOROVOD_FUSION_THRESHOLD
    bytes if set, else 25 MB). With `op=hvd.Adasum` it is Horovod's Adasum optimizer
    instead (`elastic.torch.adasum_optimizer`).

    Horde additions: `compression=hvd.Compression.topk(density)` sends only the largest
    gradient entries (with error feedback); `staleness=S > 0` lets a worker run up to S
    rounds ahead of the last aggregate it applied, so slow peers and links do not stall
    it (`round_deadline` in seconds, default adaptive; `staleness_weight(s)` weighs a
    contribution `s` aggregates old, default 1/(1+s); `norm_check`, an
    `elastic.rounds.NormCheck`, sets when a contribution is rejected and a node evicted).
    """
    if not isinstance(staleness, int) or isinstance(staleness, bool) or staleness < 0:
        raise ValueError(f"staleness={staleness!r} must be an integer >= 0 (0: synchronous)")
    if round_deadline is not None and round_deadline < 0:
        raise ValueError(f"round_deadline={round_deadline!r} must be >= 0 seconds or None")
    if norm_check is not None and not isinstance(norm_check, NormCheck):
        raise TypeError(f"norm_check must be an elastic.rounds.NormCheck, got "
                        f"{type(norm_check).__name__}")
    if norm_check is not None and staleness == 0:
        raise ValueError("norm_check applies to the rounds of staleness >= 1; with "
                         "staleness=0 leave it out")
    special = staleness > 0 or isinstance(compression, TopKCompression)
    if special and ReduceOp(int(op)) != Average:
        raise ValueError("top-k compression and staleness average gradients; use "
                         "op=hvd.Average (the default)")
    if special and (backward_passes_per_step != 1 or gradient_predivide_factor != 1.0):
        raise ValueError("top-k compression and staleness do not support "
                         "backward_passes_per_step > 1 or gradient_predivide_factor yet")
    op = ReduceOp(int(op))
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if gradient_predivide_factor <= 0:
        raise ValueError(f"gradient_predivide_factor={gradient_predivide_factor} must be > 0")
    if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step={backward_passes_per_step!r} must be an "
                         "integer >= 1")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed",
                      DeprecationWarning, stacklevel=2)
        if groups is None:
            groups = num_groups
    if groups is not None:
        if isinstance(groups, bool) or not (isinstance(groups, (list, tuple))
                                            or (isinstance(groups, int) and groups > 0)):
            raise ValueError("groups should be a non-negative integer or a list of list of "
                             "torch.Tensor.")
        if isinstance(groups, (list, tuple)):
            seen: set[int] = set()
            for group in groups:
                for p in group:
                    if not isinstance(p, torch.Tensor):
                        raise ValueError("groups must consist of torch.Tensor.")
                    if id(p) in seen:
                        raise ValueError("A parameter can only appear once in groups.")
                    seen.add(id(p))
            groups = [list(g) for g in groups]
    if bucket_cap_mb is not None and bucket_cap_mb <= 0:
        raise ValueError(f"bucket_cap_mb={bucket_cap_mb} must be > 0")
    if op == Adasum:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        names = parameter_names(named_parameters, params) if named_parameters is not None \
            else {}
        process_set.included()  # raises ValueError before hvd.init(), as Horovod does
        return adasum_optimizer(optimizer, names, compression, backward_passes_per_step,
                                process_set, _bucket_cap(bucket_cap_mb))

    base = optimizer.__class__
    cls = type(base.__name__, (_DistributedOptimizer, base), {"__module__": base.__module__})
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)
    wrapped.param_groups = list(optimizer.param_groups)
    wrapped._horde_setup(named_parameters, compression, backward_passes_per_step, op,
                         gradient_predivide_factor, groups, sparse_as_dense, process_set,
                         _bucket_cap(bucket_cap_mb), staleness, round_deadline, staleness_weight,
                         norm_check)
    return wrapped


__all__ = ["DistributedOptimizer"]
