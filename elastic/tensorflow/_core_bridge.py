"""The one door from `elastic.tensorflow` into Horde's framework-neutral layers.

Everything the TensorFlow frontend needs from below goes through this module, in NumPy
arrays: the session (`elastic.core.session`: lifecycle, ranks, process sets, elastic
resets), the generation's collective engine (`elastic.core.engine`), and the shared
top-k (`elastic.codecs`) and staleness (`elastic.staleness`) exchanges. Arrays become
torch CPU tensors here (`torch.from_numpy`, no copy) for the Gloo transport and come
back as arrays. Nothing here imports the PyTorch frontend.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from elastic import serialization
from elastic import state as _state
from elastic.codecs.compression import Compressor, NoneCompressor, TopKCompression
from elastic.codecs.exchange import SyncSparseExchange
from elastic.core import session
from elastic.core.capabilities import (  # noqa: F401 - the frontend's build queries
    ccl_built,
    ddl_built,
    gloo_built,
    gloo_enabled,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    rocm_built,
    start_timeline,
    stop_timeline,
    sycl_built,
)
from elastic.core.engine import Kind, ReduceOp, Request
from elastic.core.session import ProcessSet, global_process_set
from elastic.credit.steps import report_synchronous_step as report_step
from elastic.errors import (
    CollectiveMismatchError,
    CollectiveStallError,
    HorovodInternalError,
    HostsUpdatedInterrupt,
    NonFiniteGradientError,
    NotInitializedError,
    ObjectNotAllowedError,
)
from elastic.staleness.exchange import StaleExchange

__all__ = [
    "CollectiveMismatchError", "CollectiveStallError", "HorovodInternalError",
    "HostsUpdatedInterrupt", "NonFiniteGradientError", "NotInitializedError",
    "ProcessSet", "ReduceOp",
    "TopKCompression", "global_process_set", "Compressor", "NoneCompressor",
]

# -- lifecycle and topology -------------------------------------------------------------

init = session.init
shutdown = session.shutdown
record_loss = session.record_loss  # Horde: the coordinator's loss chart (not in Horovod)
is_initialized = session.is_initialized
add_process_set = session.add_process_set
remove_process_set = session.remove_process_set


def max_nonfinite_steps() -> int:
    """HORDE_MAX_NONFINITE_STEPS: non-finite synchronous steps skipped in a row before the
    job stops (0: never skip)."""
    return session.settings().max_nonfinite_steps


def report_synchronous_step() -> None:
    """Credit one synchronous gradient step of the global set (one sample per member,
    as the PyTorch optimizer does when the script passes no sample count)."""
    report_step(session.runtime(), None)


def rank() -> int:
    return session.runtime().rank


def size() -> int:
    return session.runtime().size


def local_rank() -> int:
    return session.runtime().topology.local_rank


def local_size() -> int:
    return session.runtime().topology.local_size


def cross_rank() -> int:
    return session.runtime().topology.cross_rank


def cross_size() -> int:
    return session.runtime().topology.cross_size


def is_homogeneous() -> bool:
    hosts = [m.host for m in session.runtime().generation.members]
    return len({hosts.count(h) for h in hosts}) <= 1


def _set_size(process_set: ProcessSet) -> int:
    return process_set.size() or size()


def check_root(root_rank: Any, process_set: ProcessSet) -> int:
    """`root_rank` when it is a rank of `process_set`; ValueError naming the valid range."""
    n = _set_size(process_set)
    if not isinstance(root_rank, (int, np.integer)) or not 0 <= int(root_rank) < n:
        raise ValueError(f"root_rank={root_rank!r} is not a rank of the process set "
                         f"(valid: 0..{n - 1})")
    return int(root_rank)


def resolve_op(op: Any, average: bool | None) -> ReduceOp:
    """Horovod's `op`/`average` arguments as one ReduceOp (default Average)."""
    if op is not None and average is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    if average is not None:
        return ReduceOp.Average if average else ReduceOp.Sum
    if op is None:
        return ReduceOp.Average
    try:
        return ReduceOp(int(op))
    except ValueError:
        raise ValueError(f"op={op!r} is not one of hvd.Average, Sum, Min, Max, Product, "
                         "Adasum") from None


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

def _run(request: Request) -> Any:
    return session.runtime().engine.submit(request).result()


def allreduce(arrays: Sequence[np.ndarray], op: ReduceOp, prescale: float, postscale: float,
              name: str | None, process_set: ProcessSet) -> list[np.ndarray]:
    """Reduce every array over the ranks of `process_set` as one fused request."""
    tensors = [_torch(a) for a in arrays]
    if op == ReduceOp.Adasum and any(not t.dtype.is_floating_point for t in tensors):
        raise ValueError("op=hvd.Adasum needs floating-point tensors; use hvd.Sum or "
                         "hvd.Average for integer tensors")
    out = _run(Request(Kind.ALLREDUCE, tensors, name=name, op=op, prescale=prescale,
                       postscale=postscale, process_set_id=session.process_set_id(process_set)))
    return [_numpy(t) for t in out]


def allgather(arrays: Sequence[np.ndarray], name: str | None,
              process_set: ProcessSet) -> list[np.ndarray]:
    """Concatenate every rank's arrays along the first dimension (one request)."""
    out = _run(Request(Kind.ALLGATHER, [_torch(a) for a in arrays], name=name,
                       process_set_id=session.process_set_id(process_set)))
    return [_numpy(t) for t in out]


def broadcast(array: np.ndarray, root_rank: int, name: str | None,
              process_set: ProcessSet) -> np.ndarray:
    """Rank `root_rank`'s array on every rank."""
    return broadcast_many([(name, array)], root_rank, process_set, name=name)[0]


def broadcast_many(named: Sequence[tuple[str | None, np.ndarray]], root_rank: int,
                   process_set: ProcessSet, name: str | None = None) -> list[np.ndarray]:
    """Rank `root_rank`'s arrays on every rank, in one request named after their keys (ranks
    whose key lists differ fail together)."""
    root = check_root(root_rank, process_set)
    targets = [_torch(a).clone() for _, a in named]
    if name is None and len(named) > 1:
        digest = hashlib.blake2b("\n".join(str(k) for k, _ in named).encode(),
                                 digest_size=6).hexdigest()
        name = f"broadcast_variables.{digest}"
    out = _run(Request(Kind.BROADCAST, targets, name=name, root=root,
                       process_set_id=session.process_set_id(process_set)))
    return [_numpy(t) for t in out]


def alltoall(array: np.ndarray, splits: Sequence[int] | None, name: str | None,
             process_set: ProcessSet) -> tuple[np.ndarray, np.ndarray]:
    """Slice i of `array` (by `splits`) to rank i; the received array and splits."""
    tensor = _torch(array)
    values = None if splits is None else [int(s) for s in splits]
    if values is not None:
        n, rows = _set_size(process_set), (tensor.shape[0] if tensor.dim() else 1)
        if any(s < 0 for s in values):
            raise ValueError(f"alltoall splits {values} must not be negative")
        if len(values) != n:
            raise ValueError(f"alltoall splits has {len(values)} entries; it needs one per "
                             f"rank ({n})")
        if sum(values) != rows:
            raise ValueError(f"alltoall splits sum to {sum(values)} but the tensor's first "
                             f"dimension is {rows}")
    out, received = _run(Request(Kind.ALLTOALL, [tensor], name=name, splits=values,
                                 process_set_id=session.process_set_id(process_set)))
    return _numpy(out), _numpy(received)


def reducescatter(arrays: Sequence[np.ndarray], op: ReduceOp, name: str | None,
                  process_set: ProcessSet, prescale: float,
                  postscale: float) -> list[np.ndarray]:
    """Reduce every array and give each rank its share of the first dimension."""
    if op not in (ReduceOp.Average, ReduceOp.Sum, ReduceOp.Min, ReduceOp.Max,
                  ReduceOp.Product):
        raise ValueError(f"reducescatter does not support op={op!r}")
    out = _run(Request(Kind.REDUCESCATTER, [_torch(a) for a in arrays], name=name, op=op,
                       prescale=prescale, postscale=postscale,
                       process_set_id=session.process_set_id(process_set)))
    return [_numpy(t) for t in out]


def barrier(process_set: ProcessSet) -> None:
    _run(Request(Kind.BARRIER, [], process_set_id=session.process_set_id(process_set)))


def join() -> int:
    return int(_run(Request(Kind.JOIN, [torch.zeros(1)])))


# -- Python objects -------------------------------------------------------------------

def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> Any:
    """Rank `root_rank`'s `obj` on every rank (serialized; others' `obj` is ignored)."""
    me = process_set.member_rank("broadcast_object")
    root = check_root(root_rank, process_set)
    name = name or "broadcast_object"
    blob, refusal = _encode(obj) if me == root else (None, None)
    length = np.array([_REFUSED if blob is None else len(blob)], np.int64)
    (length,) = broadcast_many([(None, length)], root, process_set, name=f"{name}.sz")
    if int(length[0]) < 0:
        raise refusal or ObjectNotAllowedError(
            f"broadcast_object: rank {root} could not send its object (it is not plain data; "
            f"rank {root}'s error names the type); {serialization.OPT_IN}")
    serialization.check_sizes("broadcast_object", [0] * root + [int(length[0])],
                              session.context().settings.max_object_bytes)
    data = (np.frombuffer(blob, np.uint8) if blob is not None
            else np.zeros(int(length[0]), np.uint8))
    (data,) = broadcast_many([(None, data)], root, process_set, name=f"{name}.t")
    return obj if me == root else _decode(data.tobytes(), f"rank {root}")


def allgather_object(obj: Any, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> list[Any]:
    """Every rank's `obj`, in rank order of the process set (plain data unless the job
    trusts its peers, as for elastic.torch)."""
    process_set.member_rank("allgather_object")
    name = name or "allgather_object"
    blob, refusal = _encode(obj)
    size = _REFUSED if blob is None else len(blob)
    (sizes,) = allgather([np.array([size], np.int64)], f"{name}.sz", process_set)
    refused = [rank for rank, n in enumerate(sizes.tolist()) if n < 0]
    if refused:
        raise refusal or ObjectNotAllowedError(
            f"allgather_object: rank(s) {refused} could not send their objects (not plain "
            f"data; their errors name the types); {serialization.OPT_IN}")
    serialization.check_sizes("allgather_object", sizes.tolist(),
                              session.context().settings.max_object_bytes)
    assert blob is not None
    (data,) = allgather([np.frombuffer(blob, np.uint8)], f"{name}.t", process_set)
    out, offset = [], 0
    for rank, n in enumerate(sizes.tolist()):
        out.append(_decode(data[offset:offset + n].tobytes(), f"rank {rank}"))
        offset += n
    return out


# Peer bytes are data, never code (elastic/serialization.py, shared with elastic.torch): a
# rank whose object is not plain data announces size -1, so every rank raises together.
_REFUSED = -1


def _trusted() -> bool:
    return session.context().settings.trusted_peers


def _encode(obj: Any) -> tuple[bytes | None, ObjectNotAllowedError | None]:
    return serialization.describe(lambda: serialization.encode(obj, _trusted()))


def _decode(data: bytes, source: str) -> Any:
    return serialization.decode(data, _trusted(), source)


# -- elastic --------------------------------------------------------------------------

State = _state.State
ObjectState = _state.ObjectState
check_host_updates = session.check_host_updates


def bcast_object_from_root(obj: Any) -> Any:
    return broadcast_object(obj, root_rank=0)


def elastic_run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Horovod's `hvd.elastic.run` retry loop on the shared session."""
    return _state.run_fn(func, session.reset, session.reset_limit)


# -- shared gradient exchanges (top-k, staleness) -------------------------------------

class _FlatLayout:
    """A frontend's gradients (NumPy arrays) as the shared exchanges' one flat buffer:
    tensors of at least `min_sparse` values first (sparsified), small ones after."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: np.dtype,
                 min_sparse: int) -> None:
        sizes = [int(np.prod(s)) for s in shapes]
        self.order = ([i for i, n in enumerate(sizes) if n >= min_sparse]
                      + [i for i, n in enumerate(sizes) if n < min_sparse])
        self.shapes, self.sizes = list(shapes), sizes
        self.sparse_numel = sum(n for n in sizes if n >= min_sparse)
        self.numel = sum(sizes)
        self.dtype = _torch(np.zeros(0, dtype)).dtype
        self.grads: list[np.ndarray | None] = [None] * len(shapes)
        self.result: list[np.ndarray] = []

    def gather(self, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None or out.numel() != self.numel:
            out = torch.empty(self.numel, dtype=self.dtype)
        offset = 0
        for i in self.order:
            n, g = self.sizes[i], self.grads[i]
            if g is None:
                out[offset:offset + n].zero_()
            else:
                out[offset:offset + n].copy_(_torch(g).reshape(-1))
            offset += n
        return out

    def scatter(self, flat: torch.Tensor, scale: float = 1.0) -> None:
        result: list[Any] = [None] * len(self.shapes)
        offset = 0
        for i in self.order:
            n = self.sizes[i]
            part = flat[offset:offset + n].reshape(self.shapes[i])
            result[i] = (_numpy(part * scale) if scale != 1.0 else _numpy(part).copy())
            offset += n
        self.result = result


class SparseAllreduce:
    """Synchronous top-k averaging of one list of gradients per step, with error feedback:
    the shared `SyncSparseExchange`."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: np.dtype,
                 spec: TopKCompression, process_set: ProcessSet) -> None:
        self._layout = _FlatLayout(shapes, dtype, spec.min_sparse_numel)
        # A rank's NaN/Inf gradient makes the average NaN: the caller's non-finite guard
        # (Keras DistributedOptimizer, apply_gradients_if_finite) skips the step on every
        # rank and counts it, as in dense steps and the PyTorch optimizer.
        self._exchange = SyncSparseExchange(self._layout, spec.build(), nonfinite_skips=True)
        self._process_set = process_set

    def reduce(self, grads: Sequence[np.ndarray | None]) -> list[np.ndarray]:
        """The average over ranks of every rank's top-k-sparsified `grads`."""
        self._layout.grads = list(grads)
        self._exchange.reduce(session.runtime(), _set_size(self._process_set),
                              session.process_set_id(self._process_set))
        return self._layout.result

    @property
    def stats(self) -> Any:
        return self._exchange.stats


ApplyAggregate = Callable[[list[np.ndarray], float, "float | None"], None]
"""Steps the optimizer on an aggregate: (aggregate, lr_factor, learning rate or None)."""


class _Stepper:
    """The frontend's optimizer as the staleness rounds step it."""

    def __init__(self, layout: _FlatLayout, apply: ApplyAggregate, momentum: bool,
                 adaptive: bool, lr: Callable[[], float | None] | None) -> None:
        self._layout, self._apply = layout, apply
        self._momentum, self._adaptive, self._lr = momentum, adaptive, lr

    def momentum(self) -> bool:
        return self._momentum

    def adaptive(self) -> bool:
        return self._adaptive

    def lrs(self) -> list[float] | None:
        rate = self._lr() if self._lr is not None else None
        return None if rate is None else [float(rate)]

    def step(self, lr_factor: float = 1.0, lrs: list[float] | None = None) -> None:
        self._apply(self._layout.result, lr_factor, lrs[0] if lrs else None)


class StaleAllreduce:
    """Bounded-staleness rounds over one list of gradients per step: the shared
    `StaleExchange`; `step` calls `apply(aggregate, lr_factor)` once per finished round."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: np.dtype,
                 spec: TopKCompression | None, staleness: int, process_set: ProcessSet,
                 round_deadline: float | None = None) -> None:
        if process_set.process_set_id not in (0, None):
            raise ValueError("staleness > 0 runs on the global process set only")
        self._layout = _FlatLayout(shapes, dtype, spec.min_sparse_numel if spec else 1 << 62)
        self._exchange = StaleExchange(self._layout, spec.build() if spec else None, staleness,
                                       round_deadline, None)

    def step(self, grads: Sequence[np.ndarray | None], samples: int, apply: ApplyAggregate,
             momentum: bool = False, adaptive: bool = False,
             lr: Callable[[], float | None] | None = None) -> None:
        """`lr` tells the optimizer's learning rate now (None: a schedule the rounds leave
        alone); every member applies a round with the lowest rate any of them sent."""
        self._layout.grads = list(grads)
        self._exchange.step(session.runtime(), samples,
                            _Stepper(self._layout, apply, momentum, adaptive, lr))

    def finish(self, apply: ApplyAggregate, momentum: bool = False, adaptive: bool = False,
               lr: Callable[[], float | None] | None = None) -> None:
        self._exchange.finish(_Stepper(self._layout, apply, momentum, adaptive, lr))

    @property
    def stats(self) -> Any:
        return self._exchange.stats
