"""The one door from `elastic.tensorflow` into Horde's framework-neutral layers.

Everything the TensorFlow frontend needs from below (the worker's lifecycle, ranks,
process sets, the collective engine, object exchange, elastic state and the shared
top-k and staleness code) goes through this module, in NumPy arrays: the frontend
converts TensorFlow tensors to arrays, this module wraps them as torch CPU tensors
(`torch.from_numpy`, no copy) for the Gloo transport and hands arrays back. When the
core moves (`elastic.core`), only the imports here change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from elastic import state as _state
from elastic.compression import TopKCompression
from elastic.engine import ReduceOp
from elastic.errors import (
    CollectiveMismatchError,
    CollectiveStallError,
    HorovodInternalError,
    HostsUpdatedInterrupt,
    NotInitializedError,
)
from elastic.torch import basics as _basics
from elastic.torch import collectives as _coll
from elastic.torch import functions as _functions
from elastic.torch import runtime as _runtime
from elastic.torch.elastic import state as _torch_state
from elastic.torch.exchange import StaleExchange, SyncSparseExchange
from elastic.torch.runtime import ProcessSet, global_process_set

__all__ = [
    "CollectiveMismatchError", "CollectiveStallError", "HorovodInternalError",
    "HostsUpdatedInterrupt", "NotInitializedError", "ProcessSet", "ReduceOp",
    "TopKCompression", "global_process_set",
]

# -- lifecycle and topology -------------------------------------------------------------

init = _runtime.init
shutdown = _runtime.shutdown
is_initialized = _runtime.is_initialized
add_process_set = _runtime.add_process_set
remove_process_set = _runtime.remove_process_set
rank = _basics.rank
size = _basics.size
local_rank = _basics.local_rank
local_size = _basics.local_size
cross_rank = _basics.cross_rank
cross_size = _basics.cross_size
is_homogeneous = _basics.is_homogeneous
gloo_built = _basics.gloo_built
start_timeline = _basics.start_timeline
stop_timeline = _basics.stop_timeline


def check_root(root_rank: int, process_set: ProcessSet) -> int:
    """`root_rank` when it is a rank of `process_set`; ValueError naming the valid range."""
    return _coll._check_root(root_rank, process_set)


def resolve_op(op: Any, average: bool | None) -> ReduceOp:
    """Horovod's `op`/`average` arguments as one ReduceOp (default Average)."""
    return _coll._resolve_op(op, average)


# -- conversion -----------------------------------------------------------------------

def _torch(array: np.ndarray) -> torch.Tensor:
    """A torch view of `array` (copied only when torch cannot share its memory)."""
    array = np.asarray(array)
    if not array.flags.c_contiguous or not array.flags.writeable:
        array = np.ascontiguousarray(array).copy()
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: same bits as torch's
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    try:
        return torch.from_numpy(array)
    except TypeError as exc:
        raise TypeError(f"dtype {array.dtype} is not supported by Horde's collectives "
                        "(use a floating-point, integer or bool dtype)") from exc


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


# -- collectives (NumPy in, NumPy out) -------------------------------------------------

def allreduce(arrays: Sequence[np.ndarray], op: ReduceOp, prescale: float, postscale: float,
              name: str | None, process_set: ProcessSet) -> list[np.ndarray]:
    """Reduce every array over the ranks of `process_set` as one fused request."""
    handle = _coll._allreduce_async_impl([_torch(a) for a in arrays], None, name, op,
                                         prescale, postscale, process_set, True)
    return [_numpy(t) for t in _coll.synchronize(handle)]


def allgather(arrays: Sequence[np.ndarray], name: str | None,
              process_set: ProcessSet) -> list[np.ndarray]:
    """Concatenate every rank's arrays along the first dimension (one request)."""
    handle = _coll._allgather_async_impl([_torch(a) for a in arrays], name, process_set, True)
    return [_numpy(t) for t in _coll.synchronize(handle)]


def broadcast(array: np.ndarray, root_rank: int, name: str | None,
              process_set: ProcessSet) -> np.ndarray:
    """Rank `root_rank`'s array on every rank."""
    handle = _coll._broadcast_async_impl(_torch(array), root_rank, name, process_set, False)
    return _numpy(_coll.synchronize(handle))


def broadcast_many(named: Sequence[tuple[str, np.ndarray]], root_rank: int,
                   process_set: ProcessSet) -> list[np.ndarray]:
    """Rank `root_rank`'s arrays on every rank, in one request keyed by their names (ranks
    whose name lists differ fail together)."""
    tensors = [(key, _torch(a).clone()) for key, a in named]
    _functions.broadcast_parameters(tensors, root_rank, process_set=process_set)
    return [_numpy(t) for _, t in tensors]


def alltoall(array: np.ndarray, splits: Sequence[int] | None, name: str | None,
             process_set: ProcessSet) -> tuple[np.ndarray, np.ndarray]:
    """Slice i of `array` (by `splits`) to rank i; the received array and splits."""
    out, received = _coll.synchronize(_coll.alltoall_async(
        _torch(array), list(splits) if splits is not None else None, name, process_set))
    return _numpy(out), _numpy(received)


def reducescatter(arrays: Sequence[np.ndarray], op: ReduceOp, name: str | None,
                  process_set: ProcessSet, prescale: float,
                  postscale: float) -> list[np.ndarray]:
    """Reduce every array and give each rank its share of the first dimension."""
    handle = _coll._reducescatter_async_impl([_torch(a) for a in arrays], name, ReduceOp(op),
                                             prescale, postscale, process_set, True)
    return [_numpy(t) for t in _coll.synchronize(handle)]


def barrier(process_set: ProcessSet) -> None:
    _coll.barrier(process_set)


def join() -> int:
    return _coll.join()


broadcast_object = _functions.broadcast_object
allgather_object = _functions.allgather_object


# -- elastic --------------------------------------------------------------------------

State = _state.State
ObjectState = _state.ObjectState
check_host_updates = _torch_state.check_host_updates


def bcast_object_from_root(obj: Any) -> Any:
    return _functions.broadcast_object(obj, root_rank=0)


def elastic_run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Horovod's `hvd.elastic.run` retry loop on the shared lifecycle."""
    from elastic.torch import elastic as _torch_elastic

    return _torch_elastic.run(func)


# -- shared gradient exchanges (top-k, staleness) -------------------------------------

class _Shadow:
    """Torch stand-ins for a framework's parameters: the shared exchanges read and write
    `.grad` of these; the frontend copies its gradients in and the results out."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: np.dtype) -> None:
        tdtype = torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
        self.params = [torch.zeros(shape, dtype=tdtype) for shape in shapes]
        self.param_groups = [{"params": self.params, "momentum": 0.0}]

    def load(self, grads: Sequence[np.ndarray | None]) -> None:
        """Copy `grads` in (the exchanges write into `.grad`; the arrays may share memory
        with immutable framework tensors)."""
        for p, g in zip(self.params, grads):
            if g is None:
                p.grad = None
            elif p.grad is None:
                p.grad = torch.from_numpy(np.array(g, copy=True)).reshape(p.shape)
            else:
                p.grad.copy_(torch.from_numpy(np.asarray(g)).reshape(p.shape))

    def grads(self) -> list[np.ndarray]:
        return [_numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape),
                                                                    p.numpy().dtype)
                for p in self.params]


class SparseAllreduce:
    """Synchronous top-k averaging of one list of gradients per step, with error feedback:
    the shared `SyncSparseExchange` on torch stand-ins of the gradients."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: np.dtype,
                 spec: TopKCompression, process_set: ProcessSet) -> None:
        self._shadow = _Shadow(shapes, dtype)
        self._exchange = SyncSparseExchange(self._shadow, self._shadow.params, spec,
                                            process_set)

    def reduce(self, grads: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """The average over ranks of every rank's top-k-sparsified `grads`."""
        self._shadow.load(grads)
        self._exchange.reduce()
        return self._shadow.grads()

    @property
    def stats(self) -> Any:
        return self._exchange.stats


class StaleAllreduce:
    """Bounded-staleness rounds over one list of gradients per step: the shared
    `StaleExchange`; `step` calls `apply(aggregate, lr_factor)` once per finished round."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: np.dtype,
                 spec: TopKCompression | None, staleness: int, process_set: ProcessSet,
                 round_deadline: float | None = None) -> None:
        self._shadow = _Shadow(shapes, dtype)
        self._exchange = StaleExchange(self._shadow, self._shadow.params, spec, staleness,
                                       round_deadline, None, process_set)

    def step(self, grads: Sequence[np.ndarray | None], samples: int,
             apply: Callable[[list[np.ndarray], float], None], momentum: bool = False,
             adaptive: bool = False) -> None:
        """Submit `grads`; `momentum` makes stale aggregates take shorter steps (here by
        scaling the aggregate, so `apply` always gets the factor 1.0)."""
        self._shadow.param_groups[0]["momentum"] = 0.9 if momentum else 0.0
        self._shadow.load(grads)
        self._exchange.step(samples, lambda: apply(self._shadow.grads(), 1.0))

    def finish(self, apply: Callable[[list[np.ndarray], float], None], momentum: bool = False,
               adaptive: bool = False) -> None:
        self._shadow.param_groups[0]["momentum"] = 0.9 if momentum else 0.0
        self._exchange.finish(lambda: apply(self._shadow.grads(), 1.0))

    @property
    def stats(self) -> Any:
        return self._exchange.stats
