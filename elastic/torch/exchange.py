"""PyTorch's side of the exchanges other than Horovod's dense allreduce (top-k, staleness).

The exchanges themselves are framework-neutral (`elastic.codecs.exchange`,
`elastic.staleness.exchange`); here is what they need from PyTorch: the parameters'
gradients as one flat buffer (`FlatLayout`: parameters of at least `min_sparse_numel`
values first, the part that is sparsified; small ones after it, sent dense), the
optimizer as the rounds step it (`TorchStepper`, `momentum_from`), and the user-facing
`hvd.TopKAllreduce` and `hvd.StalenessRounds`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from elastic.codecs.aggregate import allreduce_bytes
from elastic.codecs.compression import TopKCompression
from elastic.codecs.exchange import average_payloads
from elastic.codecs.stats import RoundStats
from elastic.staleness import rounds as core_rounds

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


class TorchStepper:
    """A torch optimizer as the staleness rounds step it (`elastic.staleness.exchange.Stepper`):
    `step` runs the wrapped optimizer's own step."""

    def __init__(self, optimizer: torch.optim.Optimizer, step: Callable[[], None]) -> None:
        self._optimizer = optimizer
        self._step = step

    def momentum(self) -> bool:
        return any(float(g.get("momentum", 0.0) or 0.0) > 0
                   or float((g.get("betas") or (0.0,))[0]) > 0
                   for g in self._optimizer.param_groups)

    def adaptive(self) -> bool:
        """Adam, AdamW, ...: param groups with `betas`."""
        return any("betas" in g for g in self._optimizer.param_groups)

    def lrs(self) -> list[float] | None:
        """This member's learning rates, one per param group (None if a group has none)."""
        try:
            return [float(g["lr"]) for g in self._optimizer.param_groups]
        except (KeyError, TypeError, ValueError, RuntimeError):
            return None

    def step(self, lr_factor: float = 1.0, lrs: list[float] | None = None) -> None:
        """Step with the round's agreed learning rates (`RoundResult.lrs`, the same on
        every member, so a schedule stepped per local step does not part them) times
        `lr_factor`, then restore each group's own (a scheduler sees its values)."""
        groups = self._optimizer.param_groups
        if lrs is not None and len(lrs) != len(groups):
            lrs = None  # another optimizer layout than the round's: keep our own rates
        if lrs is None and lr_factor == 1.0:
            self._step()
            return
        saved = [g.get("lr") for g in groups]
        try:
            for i, (g, lr) in enumerate(zip(groups, saved)):
                if lr is not None:
                    g["lr"] = (lrs[i] if lrs is not None else lr) * lr_factor
            self._step()
        finally:
            for g, lr in zip(groups, saved):
                if lr is not None:
                    g["lr"] = lr


def report_synchronous_step(samples: int | None, process_set: Any) -> None:
    """A synchronous step of the global set: credit it (`elastic.credit.steps`)."""
    from elastic.credit import steps
    from elastic.torch.runtime import runtime

    if process_set.process_set_id in (0, None):
        steps.report_synchronous_step(runtime(), samples)


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
        from elastic.codecs.robust import MultiKrum
        from elastic.core.session import settings
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
            dense_wire=self.compressor.value_dtype if dense else None,
            robust=MultiKrum(f) if (f := settings().robust_aggregation) else None,
            stats=self.stats)
        self.stats.rejected += len(rejected)
        self.stats.rounds += 1
        self.stats.bytes_sent += sent
        self.stats.dense_bytes += int(allreduce_bytes(flat.numel(), size, flat.element_size()))
        self.stats.last_density = self.compressor.density(step)
        return out.view_as(tensor)
