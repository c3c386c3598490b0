"""Horovod's Adasum optimizer: `DistributedOptimizer(optimizer, op=hvd.Adasum)`.

Each rank first steps the wrapped optimizer on its own gradients; what is combined across
ranks is the change of the parameters (the *delta*), by Adasum (`elastic.core.adasum`), and
every rank then sets its parameters to their value before the step plus the combined
delta. Adasum adapts to the deltas: their sum when they are orthogonal, their average when
they are parallel, so the learning rate needs less scaling with the number of ranks than
with averaging (Horovod's guide: about 2-2.5x the best single-worker rate, not N times).

Horovod steps each parameter in its gradient hook; Horde steps the whole wrapped
optimizer in `step()` and reduces the deltas in buckets of a fixed order (Gloo pairs
collectives by order). For optimizers that treat parameters independently (SGD, Adam,
...) the result is the same.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from elastic.codecs.compression import Compressor
from elastic.torch.collectives import Adasum, grouped_allreduce_async_, synchronize
from elastic.torch.exchange import report_synchronous_step
from elastic.torch.runtime import ProcessSet

_TOO_MANY_PASSES = ("Gradients were computed more than backward_passes_per_step times before "
                    "call to step(). Increase backward_passes_per_step to accumulate gradients "
                    "locally.")


#: Horovod's message when zero_grad() would race a reduction (both optimizers raise it).
ZERO_GRAD_RACE = (
    "optimizer.zero_grad() was called after loss.backward() but before optimizer.step() or "
    "optimizer.synchronize(). This is prohibited as it can cause a race condition.")

class _DistributedAdasumOptimizer:
    """Mixin placed before the wrapped optimizer's class; see the module docstring."""

    def _horde_setup(self, names: dict[int, str], compression: type[Compressor],
                     backward_passes_per_step: int, process_set: ProcessSet,
                     bucket_cap: int) -> None:
        self._compression = compression
        self.backward_passes_per_step = backward_passes_per_step
        self.process_set = process_set
        self._names = names
        self._bucket_cap = bucket_cap
        self._lock = threading.Lock()
        self._passes: dict[int, int] = {}
        self._hooks: list[Any] = []
        ref = weakref.ref(self)
        for p in self._params():
            self._hooks.append(p.register_post_accumulate_grad_hook(
                lambda param, ref=ref: on_grad_ready(ref, param)))
        weakref.finalize(self, remove_hooks, self._hooks)

    def _params(self) -> list[torch.Tensor]:
        """The parameters whose deltas are combined, in the same order on every rank."""
        return [p for group in self.param_groups  # type: ignore[attr-defined]
                for p in group["params"] if p.requires_grad]

    def _grad_ready(self, p: torch.Tensor) -> None:
        with self._lock:
            passes = self._passes.get(id(p), 0) + 1
            if passes > self.backward_passes_per_step:
                raise AssertionError(_TOO_MANY_PASSES)
            self._passes[id(p)] = passes

    def _buckets(self, params: list[torch.Tensor]) -> list[list[int]]:
        """Indices of `params` in reduction order, split by dtype and the bucket size."""
        buckets: list[list[int]] = []
        nbytes = 0
        for i, p in enumerate(params):
            size = p.numel() * p.element_size()
            if not buckets or nbytes + size > self._bucket_cap \
                    or p.dtype != params[buckets[-1][0]].dtype \
                    or p.device != params[buckets[-1][0]].device:
                buckets.append([])
                nbytes = 0
            buckets[-1].append(i)
            nbytes += size
        return buckets

    # -- Horovod's public methods -----------------------------------------------------

    def set_backward_passes_per_step(self, passes: int) -> None:
        """Change how many backward passes may accumulate before `step()`."""
        with self._lock:
            self.backward_passes_per_step = passes
            self._passes.clear()

    def synchronize(self) -> None:
        """Nothing to do: the Adasum optimizer combines parameter deltas inside `step()`."""

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        raise AssertionError("Skipping synchronization is not supported when using Adasum "
                             "optimizer.")
        yield  # pragma: no cover - a generator, for contextmanager

    def step(self, closure: Any = None, samples: int | None = None) -> Any:
        """Step the wrapped optimizer locally, then apply the Adasum of every rank's delta."""
        loss = closure() if closure is not None else None
        with self._lock:
            self._passes.clear()
        size = self.process_set.size() or 1
        if size == 1 or not self.process_set.included():
            super().step()  # type: ignore[misc]
            return loss
        params = self._params()
        with torch.no_grad():
            start = [p.detach().clone() for p in params]
            super().step()  # type: ignore[misc]
            launched = []
            for index, bucket in enumerate(self._buckets(params)):
                pairs = [self._compression.compress(params[i].detach() - start[i])
                         for i in bucket]
                name = self._names.get(id(params[bucket[0]]), f"noname.{bucket[0]}")
                handle = grouped_allreduce_async_(
                    [tensor for tensor, _ in pairs], name=f"adasum.{index}.{name}", op=Adasum,
                    process_set=self.process_set)
                launched.append((bucket, pairs, handle))
            for bucket, pairs, handle in launched:
                reduced = synchronize(handle)
                for i, out, (_, ctx) in zip(bucket, reduced, pairs):
                    params[i].copy_(start[i].add_(self._compression.decompress(out, ctx)))
        report_synchronous_step(samples, self.process_set)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients; refused between backward and step, as Horovod does."""
        if self._passes:
            raise AssertionError(ZERO_GRAD_RACE)
        super().zero_grad(set_to_none=set_to_none)  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state as torch does and forget the backward passes counted so far."""
        with self._lock:
            self._passes.clear()
        super().load_state_dict(state_dict)  # type: ignore[misc]


def on_grad_ready(ref: weakref.ReferenceType, param: torch.Tensor) -> None:
    """A gradient hook's body: tell the (weakly held) optimizer that `param` is ready."""
    optimizer = ref()
    if optimizer is not None:
        optimizer._grad_ready(param)


def remove_hooks(hooks: list[Any]) -> None:
    """Remove gradient hooks (a finalizer: the optimizer is gone)."""
    for hook in hooks:
        hook.remove()


def adasum_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str],
                     compression: type[Compressor],
                     backward_passes_per_step: int, process_set: ProcessSet,
                     bucket_cap: int) -> torch.optim.Optimizer:
    """Wrap `optimizer` as Horovod's Adasum optimizer (a subclass of its class);
    `bucket_cap` is the most bytes of deltas combined in one collective."""
    base = optimizer.__class__
    cls = type(base.__name__, (_DistributedAdasumOptimizer, base),
               {"__module__": base.__module__})
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)
    wrapped.param_groups = list(optimizer.param_groups)
    wrapped._horde_setup(names, compression, backward_passes_per_step, process_set,
                         bucket_cap)
    return wrapped
