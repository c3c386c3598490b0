"""Horovod's collective operations for PyTorch tensors, on Horde's engine.

Names, arguments, defaults and return values follow `horovod.torch`: async variants
return an integer handle for `poll`/`synchronize`, trailing-underscore variants work
in place, and the out-of-place variants carry gradients (allreduce, allgather,
broadcast, alltoall and reducescatter are differentiable).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from elastic.codecs.compression import Compression, Compressor
from elastic.core.engine import Kind, ReduceOp, Request, shard_rows
from elastic.torch import runtime
from elastic.torch.runtime import ProcessSet, global_process_set

Average = ReduceOp.Average
Sum = ReduceOp.Sum
Adasum = ReduceOp.Adasum
Min = ReduceOp.Min
Max = ReduceOp.Max
Product = ReduceOp.Product


@dataclass
class _Handle:
    future: Future
    finish: Callable[[Any], Any]


_handles: dict[int, _Handle] = {}
_handles_lock = threading.Lock()
_next_handle = 0


def _register(future: Future, finish: Callable[[Any], Any]) -> int:
    global _next_handle
    with _handles_lock:
        _next_handle += 1
        _handles[_next_handle] = _Handle(future, finish)
        return _next_handle


def _submit(request: Request) -> Future:
    return runtime.runtime().engine.submit(request)


def _pset(process_set: ProcessSet) -> int:
    return runtime.process_set_id(process_set)


def _resolve_op(op: ReduceOp | int | None, average: bool | None) -> ReduceOp:
    if op is not None and average is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    if average is not None:
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed",
                      DeprecationWarning, stacklevel=3)
        return Average if average else Sum
    if op is None:
        return Average
    try:
        return ReduceOp(int(op))
    except ValueError:
        raise ValueError(f"op={op!r} is not one of hvd.Average, Sum, Min, Max, Product, "
                         "Adasum") from None


def _check_tensor(tensor: Any, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(tensor).__name__}")
    return tensor


def _check_root(root_rank: int, process_set: ProcessSet) -> int:
    size = process_set.size() or runtime.runtime().size
    if not isinstance(root_rank, int) or not 0 <= root_rank < size:
        raise ValueError(f"root_rank={root_rank!r} is not a rank of the process set "
                         f"(valid: 0..{size - 1})")
    return root_rank


# -- handles --------------------------------------------------------------------------

def poll(handle: int) -> bool:
    """True when the operation behind `handle` has finished (successfully or not)."""
    with _handles_lock:
        entry = _handles.get(handle)
    if entry is None:
        raise ValueError(f"handle {handle} was not created or has been cleared")
    return entry.future.done()


def synchronize(handle: int) -> Any:
    """Wait for the operation behind `handle` and return its output."""
    with _handles_lock:
        entry = _handles.pop(handle, None)
    if entry is None:
        raise ValueError(f"handle {handle} was not created or has been cleared")
    return entry.finish(entry.future.result())


# -- allreduce ------------------------------------------------------------------------

def _allreduce_async_impl(tensors: list[torch.Tensor], outputs: list[torch.Tensor] | None,
                          name: str | None, op: ReduceOp, prescale: float, postscale: float,
                          process_set: ProcessSet, grouped: bool) -> int:
    if op == Adasum:
        bad = next((t.dtype for t in tensors if not t.dtype.is_floating_point), None)
        if bad is not None:
            raise ValueError(f"op=hvd.Adasum needs floating-point tensors, got {bad}; use "
                             "hvd.Sum or hvd.Average for integer tensors")
    request = Request(Kind.ALLREDUCE, list(tensors), name=name, op=op, prescale=prescale,
                      postscale=postscale, process_set_id=_pset(process_set),
                      inplace=outputs is not None and len(tensors) == 1)
    future = _submit(request)

    def finish(results: list[torch.Tensor]) -> Any:
        if outputs is not None:
            for out, res in zip(outputs, results):
                out.copy_(res)
            final = outputs
        else:
            final = results
        return final if grouped else final[0]

    return _register(future, finish)


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                    op: ReduceOp | None = None, prescale_factor: float = 1.0,
                    postscale_factor: float = 1.0,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start an allreduce of `tensor` into a new tensor; returns a handle."""
    _check_tensor(tensor, "allreduce_async")
    return _allreduce_async_impl([tensor], None, name, _resolve_op(op, average),
                                 prescale_factor, postscale_factor, process_set, False)


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
                     op: ReduceOp | None = None, prescale_factor: float = 1.0,
                     postscale_factor: float = 1.0,
                     process_set: ProcessSet = global_process_set) -> int:
    """Start an in-place allreduce of `tensor`; returns a handle."""
    _check_tensor(tensor, "allreduce_async_")
    return _allreduce_async_impl([tensor], [tensor], name, _resolve_op(op, average),
                                 prescale_factor, postscale_factor, process_set, False)


class _AllreduceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: str | None, op: ReduceOp,
                prescale: float, postscale: float, process_set: ProcessSet) -> torch.Tensor:
        ctx.op, ctx.prescale, ctx.postscale, ctx.process_set = op, prescale, postscale, process_set
        return synchronize(_allreduce_async_impl([tensor], None, name, op, prescale, postscale,
                                                 process_set, False))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        reduced = synchronize(_allreduce_async_impl(
            [grad.contiguous()], None, None, ctx.op, ctx.prescale, ctx.postscale,
            ctx.process_set, False))
        return reduced, None, None, None, None, None


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression: type[Compressor] = Compression.none, op: ReduceOp | None = None,
              prescale_factor: float = 1.0, postscale_factor: float = 1.0,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Reduce `tensor` over all ranks (default: average); differentiable."""
    _check_tensor(tensor, "allreduce")
    op = _resolve_op(op, average)
    compressed, cctx = compression.compress(tensor)
    reduced = _AllreduceFunction.apply(compressed, name, op, prescale_factor, postscale_factor,
                                       process_set)
    return compression.decompress(reduced, cctx)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
               op: ReduceOp | None = None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Reduce `tensor` over all ranks in place; returns it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor,
                                        postscale_factor, process_set))


def _check_group(tensors: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise ValueError(f"{what} expects a non-empty list of tensors")
    return [_check_tensor(t, what) for t in tensors]


def grouped_allreduce_async(tensors: Sequence[torch.Tensor], average: bool | None = None,
                            name: str | None = None, op: ReduceOp | None = None,
                            prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: ProcessSet = global_process_set) -> int:
    """Start one fused allreduce of several tensors; returns a handle."""
    tensors = _check_group(tensors, "grouped_allreduce_async")
    return _allreduce_async_impl(tensors, None, name, _resolve_op(op, average), prescale_factor,
                                 postscale_factor, process_set, True)


def grouped_allreduce_async_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                             name: str | None = None, op: ReduceOp | None = None,
                             prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: ProcessSet = global_process_set) -> int:
    """Start one fused in-place allreduce of several tensors; returns a handle."""
    tensors = _check_group(tensors, "grouped_allreduce_async_")
    return _allreduce_async_impl(tensors, tensors, name, _resolve_op(op, average),
                                 prescale_factor, postscale_factor, process_set, True)


class _GroupedAllreduceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, name: str | None, op: ReduceOp, prescale: float, postscale: float,
                process_set: ProcessSet, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.op, ctx.prescale, ctx.postscale, ctx.process_set = op, prescale, postscale, process_set
        return tuple(synchronize(_allreduce_async_impl(list(tensors), None, name, op, prescale,
                                                       postscale, process_set, True)))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        reduced = synchronize(_allreduce_async_impl(
            [g.contiguous() for g in grads], None, None, ctx.op, ctx.prescale, ctx.postscale,
            ctx.process_set, True))
        return (None, None, None, None, None, *reduced)


def grouped_allreduce(tensors: Sequence[torch.Tensor], average: bool | None = None,
                      name: str | None = None, compression: type[Compressor] = Compression.none,
                      op: ReduceOp | None = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0,
                      process_set: ProcessSet = global_process_set) -> list[torch.Tensor]:
    """Reduce several tensors in one fused operation; differentiable."""
    tensors = _check_group(tensors, "grouped_allreduce")
    op = _resolve_op(op, average)
    pairs = [compression.compress(t) for t in tensors]
    reduced = _GroupedAllreduceFunction.apply(name, op, prescale_factor, postscale_factor,
                                              process_set, *[p[0] for p in pairs])
    return [compression.decompress(r, p[1]) for r, p in zip(reduced, pairs)]


def grouped_allreduce_(tensors: Sequence[torch.Tensor], average: bool | None = None,
                       name: str | None = None, op: ReduceOp | None = None,
                       prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                       process_set: ProcessSet = global_process_set) -> list[torch.Tensor]:
    """Reduce several tensors in place in one fused operation."""
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor,
                                                postscale_factor, process_set))


# -- sparse allreduce -----------------------------------------------------------------

class SparseHandle(int):
    """The handle of `sparse_allreduce_async`: works with `poll`/`synchronize`, and,
    as Horovod's handle, can also be called to wait for the result."""

    def __call__(self) -> torch.Tensor:
        return synchronize(self)


def sparse_allreduce_async(tensor: torch.Tensor, name: str | None, op: ReduceOp | None,
                           process_set: ProcessSet = global_process_set) -> SparseHandle:
    """Start reducing a sparse COO tensor: every rank's indices and values are allgathered.

    The result (`synchronize(handle)` or `handle()`) is a sparse COO tensor that holds
    every rank's entries, not coalesced (duplicate indices add up), with the values
    divided by the number of ranks for op=Average.
    """
    _check_tensor(tensor, "sparse_allreduce_async")
    if tensor.layout != torch.sparse_coo:
        raise ValueError(f"sparse_allreduce_async expects a sparse COO tensor, got layout "
                         f"{tensor.layout}; use allreduce_async for dense tensors")
    op = _resolve_op(op, None)
    if op not in (Average, Sum):
        raise ValueError(f"sparse_allreduce_async supports op=hvd.Average or hvd.Sum, got "
                         f"{op.name}")
    # Rows of the gathered indices are entries, hence the transpose.
    indices = tensor._indices().t().contiguous()
    future = _submit(Request(Kind.ALLGATHER, [indices, tensor._values()], name=name,
                             process_set_id=_pset(process_set)))
    shape = tensor.shape
    count = process_set.size() or 1

    def finish(results: list[torch.Tensor]) -> torch.Tensor:
        gathered, values = results
        if op == Average:
            values = (values / count if values.dtype.is_floating_point
                      else torch.div(values, count, rounding_mode="trunc"))
        return torch.sparse_coo_tensor(gathered.t(), values, shape)

    return SparseHandle(_register(future, finish))


# -- allgather ------------------------------------------------------------------------

def _allgather_async_impl(tensors: list[torch.Tensor], name: str | None,
                          process_set: ProcessSet, grouped: bool) -> int:
    future = _submit(Request(Kind.ALLGATHER, tensors, name=name,
                             process_set_id=_pset(process_set)))
    return _register(future, lambda results: results if grouped else results[0])


def allgather_async(tensor: torch.Tensor, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    """Start concatenating every rank's `tensor` along dimension 0; returns a handle."""
    _check_tensor(tensor, "allgather_async")
    return _allgather_async_impl([tensor], name, process_set, False)


class _AllgatherFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: str | None,
                process_set: ProcessSet) -> torch.Tensor:
        ctx.dim0 = tensor.shape[0] if tensor.dim() else 1
        ctx.process_set = process_set
        return synchronize(_allgather_async_impl([tensor], name, process_set, False))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        # Averaged, as Horovod does: the gradient of the mean of the ranks' losses.
        summed = synchronize(_allreduce_async_impl([grad.contiguous()], None, None, Average,
                                                   1.0, 1.0, ctx.process_set, False))
        sizes = synchronize(_allgather_async_impl(
            [torch.tensor([ctx.dim0], dtype=torch.int64)], None, ctx.process_set, False))
        rank = ctx.process_set.rank()
        offset = int(sizes[:rank].sum())
        return summed.narrow(0, offset, ctx.dim0), None, None


def allgather(tensor: torch.Tensor, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dimension 0 (sizes may differ); differentiable."""
    _check_tensor(tensor, "allgather")
    return _AllgatherFunction.apply(tensor, name, process_set)


def grouped_allgather_async(tensors: Sequence[torch.Tensor], name: str | None = None,
                            process_set: ProcessSet = global_process_set) -> int:
    tensors = _check_group(tensors, "grouped_allgather_async")
    return _allgather_async_impl(tensors, name, process_set, True)


def grouped_allgather(tensors: Sequence[torch.Tensor], name: str | None = None,
                      process_set: ProcessSet = global_process_set) -> list[torch.Tensor]:
    """Allgather several tensors as one operation."""
    return synchronize(grouped_allgather_async(tensors, name, process_set))


# -- broadcast ------------------------------------------------------------------------

def _broadcast_async_impl(tensor: torch.Tensor, root_rank: int, name: str | None,
                          process_set: ProcessSet, inplace: bool) -> int:
    root = _check_root(root_rank, process_set)
    target = tensor if inplace else tensor.detach().clone()
    if not target.is_contiguous():
        raise ValueError("broadcast_ needs a contiguous tensor")
    future = _submit(Request(Kind.BROADCAST, [target], name=name, root=root,
                             process_set_id=_pset(process_set)))
    return _register(future, lambda results: results[0])


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: ProcessSet = global_process_set) -> int:
    _check_tensor(tensor, "broadcast_async")
    return _broadcast_async_impl(tensor, root_rank, name, process_set, False)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> int:
    _check_tensor(tensor, "broadcast_async_")
    return _broadcast_async_impl(tensor, root_rank, name, process_set, True)


class _BroadcastFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, root_rank: int, name: str | None,
                process_set: ProcessSet) -> torch.Tensor:
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return synchronize(_broadcast_async_impl(tensor, root_rank, name, process_set, False))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        # Averaged, as Horovod does: the gradient of the mean of the ranks' losses.
        summed = synchronize(_allreduce_async_impl([grad.contiguous()], None, None, Average,
                                                   1.0, 1.0, ctx.process_set, False))
        if ctx.process_set.rank() != ctx.root_rank:
            summed = summed * 0
        return summed, None, None, None


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Return rank `root_rank`'s `tensor` on every rank; differentiable."""
    _check_tensor(tensor, "broadcast")
    return _BroadcastFunction.apply(tensor, root_rank, name, process_set)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: ProcessSet = global_process_set) -> torch.Tensor:
    """Overwrite `tensor` with rank `root_rank`'s value, in place."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


# -- alltoall -------------------------------------------------------------------------

def _splits_list(splits: Any) -> list[int] | None:
    if splits is None:
        return None
    if isinstance(splits, torch.Tensor):
        splits = splits.tolist()
    values = [int(s) for s in splits]
    if any(s < 0 for s in values):
        raise ValueError(f"alltoall splits {values} must not be negative")
    return values


def alltoall_async(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
                   process_set: ProcessSet = global_process_set) -> int:
    """Start scattering slices of `tensor` to every rank; returns a handle."""
    _check_tensor(tensor, "alltoall_async")
    values = _splits_list(splits)
    size = process_set.size() or 0
    if values is not None:
        if len(values) != size:
            raise ValueError(f"alltoall splits has {len(values)} entries; it needs one per rank "
                             f"({size})")
        if sum(values) != (tensor.shape[0] if tensor.dim() else 1):
            raise ValueError(f"alltoall splits sum to {sum(values)} but the tensor's first "
                             f"dimension is {tensor.shape[0] if tensor.dim() else 1}")
    future = _submit(Request(Kind.ALLTOALL, [tensor], name=name, splits=values,
                             process_set_id=_pset(process_set)))
    return _register(future, lambda result: result)


class _AlltoallFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, splits: list[int] | None, name: str | None,
                process_set: ProcessSet) -> tuple[torch.Tensor, torch.Tensor]:
        output, received = synchronize(alltoall_async(tensor, splits, name, process_set))
        ctx.received, ctx.process_set = received, process_set
        ctx.mark_non_differentiable(received)
        return output, received

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_splits: Any) -> tuple[Any, ...]:
        back, _ = synchronize(alltoall_async(grad.contiguous(), ctx.received, None,
                                             ctx.process_set))
        return back, None, None, None


def alltoall(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
             process_set: ProcessSet = global_process_set) -> Any:
    """Send slice i of `tensor` (by `splits`) to rank i; differentiable.

    Returns the received tensor, plus the received splits when `splits` was given.
    """
    _check_tensor(tensor, "alltoall")
    output, received = _AlltoallFunction.apply(tensor, _splits_list(splits), name, process_set)
    return output if splits is None else (output, received)


# -- reducescatter --------------------------------------------------------------------

def _reducescatter_async_impl(tensors: list[torch.Tensor], name: str | None, op: ReduceOp,
                              prescale: float, postscale: float, process_set: ProcessSet,
                              grouped: bool) -> int:
    if op not in (Average, Sum, Min, Max, Product):
        raise ValueError(f"reducescatter does not support op={op!r}")
    future = _submit(Request(Kind.REDUCESCATTER, tensors, name=name, op=op, prescale=prescale,
                             postscale=postscale, process_set_id=_pset(process_set)))
    return _register(future, lambda results: results if grouped else results[0])


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, op: ReduceOp = Average,
                        process_set: ProcessSet = global_process_set,
                        prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> int:
    _check_tensor(tensor, "reducescatter_async")
    return _reducescatter_async_impl([tensor], name, ReduceOp(op), prescale_factor,
                                     postscale_factor, process_set, False)


class _ReducescatterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: str | None, op: ReduceOp,
                process_set: ProcessSet, prescale: float, postscale: float) -> torch.Tensor:
        ctx.op, ctx.process_set = op, process_set
        ctx.scale = prescale * postscale
        return synchronize(_reducescatter_async_impl([tensor], name, op, prescale, postscale,
                                                     process_set, False))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        gathered = synchronize(_allgather_async_impl([grad.contiguous()], None, ctx.process_set,
                                                     False))
        if ctx.op == Average:
            gathered = gathered / (ctx.process_set.size() or 1)
        if ctx.scale != 1.0:
            gathered = gathered * ctx.scale
        return gathered, None, None, None, None, None


def reducescatter(tensor: torch.Tensor, name: str | None = None,
                  compression: type[Compressor] = Compression.none, op: ReduceOp = Average,
                  process_set: ProcessSet = global_process_set, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduce `tensor` over ranks and give each rank its slice of dimension 0; differentiable."""
    _check_tensor(tensor, "reducescatter")
    compressed, cctx = compression.compress(tensor)
    out = _ReducescatterFunction.apply(compressed, name, ReduceOp(op), process_set,
                                       prescale_factor, postscale_factor)
    return compression.decompress(out, cctx)


def grouped_reducescatter_async(tensors: Sequence[torch.Tensor], name: str | None = None,
                                op: ReduceOp = Average,
                                process_set: ProcessSet = global_process_set,
                                prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> int:
    tensors = _check_group(tensors, "grouped_reducescatter_async")
    return _reducescatter_async_impl(tensors, name, ReduceOp(op), prescale_factor,
                                     postscale_factor, process_set, True)


def grouped_reducescatter(tensors: Sequence[torch.Tensor], name: str | None = None,
                          compression: type[Compressor] = Compression.none,
                          op: ReduceOp = Average, process_set: ProcessSet = global_process_set,
                          prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list[torch.Tensor]:
    """Reducescatter several tensors as one operation."""
    pairs = [compression.compress(t) for t in _check_group(tensors, "grouped_reducescatter")]
    outs = synchronize(grouped_reducescatter_async([p[0] for p in pairs], name, op, process_set,
                                                   prescale_factor, postscale_factor))
    return [compression.decompress(o, p[1]) for o, p in zip(outs, pairs)]


# -- barrier and join -----------------------------------------------------------------

def barrier(process_set: ProcessSet = global_process_set) -> None:
    """Block until every rank of the process set reaches the barrier."""
    _submit(Request(Kind.BARRIER, [], process_set_id=_pset(process_set))).result()


def join(device: int = -1) -> int:
    """Wait for every rank to join, contributing neutral values to others' collectives.

    Lets ranks with fewer batches stop early; returns the rank that joined last.
    """
    future = _submit(Request(Kind.JOIN, [torch.zeros(1)]))
    return int(future.result())


__all__ = [
    "Average", "Sum", "Adasum", "Min", "Max", "Product", "poll", "synchronize",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce",
    "sparse_allreduce_async", "SparseHandle",
    "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_", "allgather",
    "allgather_async", "grouped_allgather", "grouped_allgather_async", "broadcast",
    "broadcast_", "broadcast_async", "broadcast_async_", "alltoall", "alltoall_async",
    "reducescatter", "reducescatter_async", "grouped_reducescatter",
    "grouped_reducescatter_async", "barrier", "join", "shard_rows",
]
