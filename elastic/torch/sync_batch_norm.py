"""Horovod's `SyncBatchNorm`: batch normalization with statistics over every rank's batch.

Each rank sends its per-channel count, mean and sum of squared deviations (one small
allgather); the ranks combine them with the parallel-variance formula, which is exact
and, unlike a raw sum of squares, does not lose precision on large activations. The
backward pass allreduces the two per-channel sums that the input gradient needs. Works
on CPU and CUDA tensors; with one rank it is torch's own batch norm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from elastic.torch.collectives import Sum, allgather_async, allreduce_async, synchronize
from elastic.torch.runtime import ProcessSet, global_process_set


def _layout(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """The dimensions reduced over (all but channels) and the shape that broadcasts a channel."""
    dims = [0, *range(2, x.dim())]
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    return dims, shape


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, running_mean: torch.Tensor | None,
                running_var: torch.Tensor | None, eps: float, momentum: float,
                process_set: ProcessSet) -> torch.Tensor:
        channels = x.shape[1]
        dims, shape = _layout(x)
        xc = x.to(_compute_dtype(x))
        local_n = x.numel() // channels if channels else 0
        if local_n:
            mean = xc.mean(dims)
            m2 = (xc - mean.view(shape)).pow(2).sum(dims)
        else:
            mean = xc.new_zeros(channels)
            m2 = xc.new_zeros(channels)
        packed = torch.cat([mean.new_tensor([float(local_n)]), mean, m2]).double().unsqueeze(0)
        table = synchronize(allgather_async(packed, name="sync_batch_norm.stats",
                                             process_set=process_set))
        counts, means, m2s = table[:, :1], table[:, 1:channels + 1], table[:, channels + 1:]
        total = float(counts.sum())
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"{int(total)} over all ranks")
        g_mean = (counts * means).sum(0) / total
        g_m2 = (m2s + counts * (means - g_mean).pow(2)).sum(0)
        g_var = g_m2 / total
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(g_mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                unbiased = g_m2 / (total - 1)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        mean_c = g_mean.to(xc.dtype)
        invstd = torch.rsqrt(g_var + eps).to(xc.dtype)
        out = (xc - mean_c.view(shape)) * invstd.view(shape)
        if weight is not None:
            out = out * weight.to(xc.dtype).view(shape)
        if bias is not None:
            out = out + bias.to(xc.dtype).view(shape)
        ctx.save_for_backward(x, weight, mean_c, invstd)
        ctx.total = total
        ctx.process_set = process_set
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        dims, shape = _layout(x)
        xc = x.to(mean.dtype)
        dy = grad_out.to(mean.dtype)
        xmu = xc - mean.view(shape)
        sum_dy = dy.sum(dims)
        sum_dy_xmu = (dy * xmu).sum(dims)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            packed = torch.cat([sum_dy, sum_dy_xmu])
            reduced = synchronize(allreduce_async(packed, op=Sum, name="sync_batch_norm.grads",
                                                  process_set=ctx.process_set))
            channels = sum_dy.numel()
            mean_dy = reduced[:channels] / ctx.total
            mean_dy_xmu = reduced[channels:] / ctx.total
            scale = invstd if weight is None else invstd * weight.to(mean.dtype)
            grad_x = (dy - mean_dy.view(shape)
                      - xmu * (invstd * invstd * mean_dy_xmu).view(shape)) * scale.view(shape)
            grad_x = grad_x.to(x.dtype)
        # Weight and bias gradients stay local: DistributedOptimizer averages them.
        if weight is not None and need_w:
            grad_w = (sum_dy_xmu * invstd).to(weight.dtype)
        if weight is not None and need_b:
            grad_b = sum_dy.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch normalization whose training statistics cover the batches of all ranks.

    Same arguments as Horovod's (plus torch's `device`/`dtype` and a Horde
    `process_set`); accepts input of shape (N, C, ...).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_set: ProcessSet = global_process_set, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_set = process_set

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        if not self.training and self.track_running_stats:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, False, factor, self.eps)
        tracked = self.training and self.track_running_stats
        running_mean = self.running_mean if tracked else None
        running_var = self.running_var if tracked else None
        if (self.process_set.size() or 1) == 1:
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, True,
                                factor, self.eps)
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean,
                                            running_var, self.eps, factor, self.process_set)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module,
                               process_set: ProcessSet = global_process_set) -> torch.nn.Module:
        """Replace every batch-norm layer in `module` by a SyncBatchNorm sharing its tensors."""
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            sync = cls(module.num_features, module.eps, module.momentum, module.affine,
                       module.track_running_stats, process_set=process_set)
            if module.affine:
                with torch.no_grad():
                    sync.weight = module.weight
                    sync.bias = module.bias
            sync.running_mean = module.running_mean
            sync.running_var = module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
            sync.train(module.training)
            return sync
        for name, child in list(module.named_children()):
            module.add_module(name, cls.convert_sync_batchnorm(child, process_set))
        return module


__all__ = ["SyncBatchNorm"]
