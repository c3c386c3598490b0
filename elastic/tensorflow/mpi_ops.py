"""Horovod's collectives for TensorFlow tensors, eager and inside `tf.function`.

Each collective converts its inputs to NumPy at the boundary and runs on Horde's engine
through `_core_bridge`. Eagerly it runs at once; in a graph it becomes one
`tf.py_function` (ordered by TensorFlow's automatic control dependencies, so every rank
issues its collectives in program order). Gradients are those Horovod registers:
allreduce, allgather, broadcast, alltoall and reducescatter are differentiable.

Misuse fails as Horovod's TensorFlow ops fail: ranks that disagree on shape, dtype or
root rank raise `tf.errors.FailedPreconditionError` on every rank; a bad argument raises
`tf.errors.InvalidArgumentError`. Inside `tf.function` TensorFlow reports every failure
of a `py_function` as `tf.errors.UnknownError`; its message starts with the kind above.
A failed collective raises `HorovodInternalError` (inside `tf.function`, TensorFlow
reports it as an `OpError`; `hvd.elastic.run` turns it back into `HorovodInternalError`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from elastic.tensorflow import _core_bridge as core
from elastic.tensorflow._core_bridge import ProcessSet, ReduceOp, global_process_set
from elastic.tensorflow.compression import Compression, Compressor

logger = logging.getLogger(__name__)

Average = ReduceOp.Average
Sum = ReduceOp.Sum
Adasum = ReduceOp.Adasum
Min = ReduceOp.Min
Max = ReduceOp.Max
Product = ReduceOp.Product

# -- errors -----------------------------------------------------------------------------

# Process-wide, not per thread: TensorFlow runs a graph's py_functions on its own threads.
_last_error: list[BaseException | None] = [None]
_last_error_lock = threading.Lock()


def _remember(exc: BaseException) -> None:
    with _last_error_lock:
        _last_error[0] = exc


def horde_error_behind(exc: BaseException) -> BaseException | None:
    """The Horde error (HorovodInternalError, HostsUpdatedInterrupt) that a TensorFlow
    `OpError` from a graph-mode collective stands for, else None."""
    with _last_error_lock:
        inner = _last_error[0]
        if isinstance(exc, tf.errors.OpError) and isinstance(
                inner, (core.HorovodInternalError, core.HostsUpdatedInterrupt)):
            _last_error[0] = None
            return inner
    return None


def _translate(exc: BaseException) -> BaseException:
    """Horovod's TensorFlow error kinds for what the engine raises."""
    if isinstance(exc, core.CollectiveMismatchError):
        return tf.errors.FailedPreconditionError(None, None, str(exc))
    if isinstance(exc, core.NotInitializedError):
        return exc
    if isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, tf.errors.OpError):
        return tf.errors.InvalidArgumentError(None, None, f"{type(exc).__name__}: {exc}")
    return exc


def _guarded(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except BaseException as exc:  # noqa: BLE001 - translated and re-raised
        _remember(exc)
        translated = _translate(exc)
        if translated is exc:
            raise
        raise translated from exc


# -- running a collective eagerly or in a graph ---------------------------------------

def _to_numpy(tensor: Any) -> np.ndarray:
    return tensor.numpy() if hasattr(tensor, "numpy") else np.asarray(tensor)


def _run(fn: Callable[..., list[Any]], inputs: Sequence[tf.Tensor], tout: Sequence[tf.DType],
         shapes: Sequence[tf.TensorShape | None]) -> list[tf.Tensor]:
    """Run `fn(*numpy arrays) -> list of arrays` on `inputs`, now or as a graph op."""
    def body(*tensors: tf.Tensor) -> list[tf.Tensor]:
        arrays = [_to_numpy(t) for t in tensors]
        results = _guarded(fn, *arrays)
        return [tf.convert_to_tensor(r, dtype=d) for r, d in zip(results, tout)]

    if tf.executing_eagerly():
        return body(*inputs)
    outs = tf.py_function(func=body, inp=list(inputs), Tout=list(tout))
    if not isinstance(outs, (list, tuple)):
        outs = [outs]
    for out, shape in zip(outs, shapes):
        if shape is not None:
            out.set_shape(shape)
    return list(outs)


def _tensor(value: Any) -> tf.Tensor:
    if isinstance(value, tf.Variable):
        return tf.convert_to_tensor(value)
    return tf.convert_to_tensor(value)


def _rest(shape: tf.TensorShape) -> tf.TensorShape:
    """`shape` with an unknown first dimension (the result of allgather and friends)."""
    if shape.rank is None:
        return tf.TensorShape(None)
    if shape.rank == 0:
        return tf.TensorShape([None])
    return tf.TensorShape([None]).concatenate(shape[1:])


def _differentiable(*tensors: tf.Tensor) -> bool:
    return all(t.dtype.is_floating or t.dtype.is_complex for t in tensors)


def _custom(forward: Callable[..., Any], backward: Callable[..., Any],
            tensors: Sequence[tf.Tensor]) -> Any:
    """`forward(*tensors)` with `backward(outputs, *upstream)` as its gradient."""
    if not _differentiable(*tensors):
        return forward(*tensors)

    @tf.custom_gradient
    def op(*xs: tf.Tensor) -> Any:
        ys = forward(*xs)

        def grad(*dys: tf.Tensor) -> Any:
            return backward(ys, *dys)

        return ys, grad

    return op(*tensors)


def _set_id(process_set: ProcessSet) -> None:
    if not isinstance(process_set, ProcessSet):
        raise ValueError(f"process_set must be an hvd.ProcessSet, got {process_set!r}")


# -- allreduce ------------------------------------------------------------------------

def _allreduce_dense(tensors: list[tf.Tensor], name: str | None, op: ReduceOp,
                     prescale: float, postscale: float,
                     process_set: ProcessSet) -> list[tf.Tensor]:
    def forward(*xs: tf.Tensor) -> list[tf.Tensor]:
        return _run(lambda *a: core.allreduce(a, op, prescale, postscale, name, process_set),
                    xs, [x.dtype for x in xs], [x.shape for x in xs])

    def backward(_ys: Any, *dys: tf.Tensor) -> list[tf.Tensor]:
        return _allreduce_dense([tf.convert_to_tensor(d) for d in dys], None, op, prescale,
                                postscale, process_set)

    out = _custom(forward, backward, tensors)
    return list(out)


def _allreduce_sparse(slices: tf.IndexedSlices, name: str | None, op: ReduceOp,
                      prescale: float, postscale: float,
                      process_set: ProcessSet) -> tf.IndexedSlices:
    """An IndexedSlices reduced as Horovod does: allgather of values and indices."""
    if op == Adasum:
        raise NotImplementedError("The Adasum reduction does not support tf.IndexedSlices; "
                                  "pass sparse_as_dense=True or use hvd.Average/hvd.Sum")
    if op not in (Average, Sum):
        raise NotImplementedError(f"Only Sum and Average are supported with tf.IndexedSlices, "
                                  f"got {ReduceOp(op).name}")
    values, indices = grouped_allgather([slices.values, slices.indices], name=name,
                                        process_set=process_set)
    scale = prescale * postscale
    if op == Average:
        scale /= process_set.size() or core.size()
    if scale != 1.0:
        values = values * tf.cast(scale, values.dtype)
    return tf.IndexedSlices(values, indices, dense_shape=slices.dense_shape)


def allreduce(tensor: Any, average: bool | None = None, device_dense: str = "",
              device_sparse: str = "", compression: type[Compressor] = Compression.none,
              op: ReduceOp | None = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, name: str | None = None,
              process_set: ProcessSet = global_process_set,
              ignore_name_scope: bool = False) -> Any:
    """Reduce a tf.Tensor, tf.Variable or tf.IndexedSlices over the ranks (default: average).

    An IndexedSlices is reduced by allgathering its values and indices, as Horovod does.
    """
    _set_id(process_set)
    op = core.resolve_op(op, average)
    if isinstance(tensor, tf.IndexedSlices):
        return _allreduce_sparse(tensor, name, op, prescale_factor, postscale_factor,
                                 process_set)
    tensor = _tensor(tensor)
    compressed, ctx = compression.compress(tensor)
    reduced = _allreduce_dense([compressed], name, op, prescale_factor, postscale_factor,
                               process_set)[0]
    return compression.decompress(reduced, ctx)


def grouped_allreduce(tensors: Sequence[Any], average: bool | None = None,
                      device_dense: str = "", device_sparse: str = "",
                      compression: type[Compressor] = Compression.none,
                      op: ReduceOp | None = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0,
                      process_set: ProcessSet = global_process_set,
                      name: str | None = None) -> list[Any]:
    """Reduce several tensors as one fused request (IndexedSlices go one by one)."""
    _set_id(process_set)
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise ValueError("grouped_allreduce expects a non-empty list of tensors")
    op = core.resolve_op(op, average)
    out: list[Any] = [None] * len(tensors)
    dense_idx = [i for i, t in enumerate(tensors) if not isinstance(t, tf.IndexedSlices)]
    pairs = [compression.compress(_tensor(tensors[i])) for i in dense_idx]
    if pairs:
        reduced = _allreduce_dense([p[0] for p in pairs], name, op, prescale_factor,
                                   postscale_factor, process_set)
        for i, r, (_, ctx) in zip(dense_idx, reduced, pairs):
            out[i] = compression.decompress(r, ctx)
    for i, t in enumerate(tensors):
        if isinstance(t, tf.IndexedSlices):
            out[i] = _allreduce_sparse(t, None, op, prescale_factor, postscale_factor,
                                       process_set)
    return out


# -- allgather ------------------------------------------------------------------------

def _dim0(x: tf.Tensor) -> tf.Tensor:
    shape = tf.shape(x, out_type=tf.int64)
    return shape[:1] if x.shape.rank != 0 else tf.constant([1], tf.int64)


def grouped_allgather(tensors: Sequence[Any], name: str | None = None,
                      ignore_name_scope: bool = False,
                      process_set: ProcessSet = global_process_set) -> list[tf.Tensor]:
    """Concatenate every rank's tensors along dimension 0 (sizes may differ); differentiable."""
    _set_id(process_set)
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise ValueError("grouped_allgather expects a non-empty list of tensors")
    tensors = [_tensor(t) for t in tensors]
    out: list[tf.Tensor] = []
    float_idx = [i for i, t in enumerate(tensors) if _differentiable(t)]

    def gather(xs: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        return _run(lambda *a: core.allgather(a, name, process_set), xs,
                    [x.dtype for x in xs], [_rest(x.shape) for x in xs])

    if len(float_idx) in (0, len(tensors)):
        def forward(*xs: tf.Tensor) -> list[tf.Tensor]:
            return gather(xs)

        def backward(_ys: Any, *dys: tf.Tensor) -> list[tf.Tensor]:
            return [_allgather_grad(x, d, process_set) for x, d in zip(tensors, dys)]

        out = list(_custom(forward, backward, tensors))
        return out
    # Mixed: gather together (one request), gradients for the floating ones only.
    results = gather(tensors)
    for i in float_idx:
        x, y = tensors[i], results[i]
        results[i] = _attach_grad(x, y, lambda d, x=x: _allgather_grad(x, d, process_set))
    return results


def _attach_grad(x: tf.Tensor, y: tf.Tensor, backward: Callable[[tf.Tensor], tf.Tensor]
                 ) -> tf.Tensor:
    """`y` (computed from `x` outside the tape) with `backward` as its gradient."""
    @tf.custom_gradient
    def link(x_in: tf.Tensor) -> Any:
        return tf.identity(y), backward

    return link(x)


def _allgather_grad(x: tf.Tensor, grad: tf.Tensor, process_set: ProcessSet) -> tf.Tensor:
    """Horovod's allgather gradient: the averaged upstream gradient, this rank's rows."""
    grad = tf.convert_to_tensor(grad)
    reduced = _allreduce_dense([grad], None, Average, 1.0, 1.0, process_set)[0]
    sizes = allgather(_dim0(x), process_set=process_set)
    me = process_set.rank() or 0
    start = tf.reduce_sum(sizes[:me])
    begin = tf.concat([[start], tf.zeros([max(grad.shape.rank or 1, 1) - 1], tf.int64)], 0)
    size = tf.concat([sizes[me:me + 1], -tf.ones([max(grad.shape.rank or 1, 1) - 1],
                                                 tf.int64)], 0)
    part = tf.slice(reduced, begin, size)
    return tf.reshape(part, tf.shape(x)) if x.shape.rank == 0 else part


def allgather(tensor: Any, name: str | None = None, ignore_name_scope: bool = False,
              process_set: ProcessSet = global_process_set) -> tf.Tensor:
    """Concatenate every rank's `tensor` along dimension 0; differentiable."""
    return grouped_allgather([tensor], name=name, process_set=process_set)[0]


# -- broadcast ------------------------------------------------------------------------

def broadcast(tensor: Any, root_rank: int, name: str | None = None,
              ignore_name_scope: bool = False,
              process_set: ProcessSet = global_process_set) -> tf.Tensor:
    """Rank `root_rank`'s `tensor` on every rank; differentiable (the root gets the
    averaged gradient, the others zeros, as in Horovod)."""
    _set_id(process_set)
    _check_root(root_rank, process_set)
    x = _tensor(tensor)

    def forward(t: tf.Tensor) -> tf.Tensor:
        return _run(lambda a: [core.broadcast(a, root_rank, name, process_set)], [t],
                    [t.dtype], [t.shape])[0]

    def backward(_y: Any, dy: tf.Tensor) -> tf.Tensor:
        reduced = _allreduce_dense([tf.convert_to_tensor(dy)], None, Average, 1.0, 1.0,
                                   process_set)[0]
        return reduced if process_set.rank() == root_rank else reduced * 0

    return _custom(forward, backward, [x])


def _check_root(root_rank: Any, process_set: ProcessSet) -> None:
    try:
        core.check_root(root_rank, process_set)
    except ValueError as exc:
        raise _translate(exc) from exc


def broadcast_(variables: Sequence[tf.Variable], root_rank: int, name: str | None = None,
               process_set: ProcessSet = global_process_set) -> list[tf.Tensor]:
    """Overwrite `variables` with rank `root_rank`'s values, in place; returns the values."""
    from elastic.tensorflow.functions import broadcast_variables

    broadcast_variables(list(variables), root_rank, process_set=process_set)
    return [tf.convert_to_tensor(v) for v in variables]


# -- alltoall -------------------------------------------------------------------------

def alltoall(tensor: Any, splits: Any = None, name: str | None = None,
             ignore_name_scope: bool = False,
             process_set: ProcessSet = global_process_set) -> Any:
    """Send slice i of `tensor` (by `splits`) to rank i; differentiable.

    Returns the received tensor, and the received splits too when `splits` was given.
    """
    _set_id(process_set)
    x = _tensor(tensor)
    split_t = None if splits is None else tf.cast(tf.convert_to_tensor(splits), tf.int32)
    received_splits: list[tf.Tensor] = []

    def exchange(t: tf.Tensor, s: tf.Tensor | None) -> list[tf.Tensor]:
        inputs = [t] if s is None else [t, s]

        def fn(a: np.ndarray, s_arr: np.ndarray | None = None) -> list[Any]:
            values = None if s_arr is None else [int(v) for v in np.ravel(s_arr)]
            if values is not None and any(v < 0 for v in values):
                raise ValueError(f"alltoall splits {values} must not be negative")
            out, received = core.alltoall(a, values, name, process_set)
            return [out, received.astype(np.int32)]

        return _run(fn, inputs, [t.dtype, tf.int32],
                    [_rest(t.shape), tf.TensorShape([None])])

    def forward(t: tf.Tensor) -> tf.Tensor:
        out, received = exchange(t, split_t)
        received_splits.append(received)
        return out

    def backward(_y: Any, dy: tf.Tensor) -> tf.Tensor:
        back, _ = exchange(tf.convert_to_tensor(dy), received_splits[0])
        return back

    output = _custom(forward, backward, [x])
    if splits is None:
        return output
    return output, tf.stop_gradient(received_splits[0])


# -- reducescatter --------------------------------------------------------------------

def grouped_reducescatter(tensors: Sequence[Any], device_dense: str = "",
                          compression: type[Compressor] = Compression.none,
                          op: ReduceOp = Average, name: str | None = None,
                          process_set: ProcessSet = global_process_set,
                          prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list[tf.Tensor]:
    """Reduce several tensors and give each rank its rows of dimension 0; differentiable."""
    _set_id(process_set)
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise ValueError("grouped_reducescatter expects a non-empty list of tensors")
    op = ReduceOp(int(op))
    if op not in (Average, Sum, Min, Max, Product):
        raise _translate(ValueError(f"reducescatter does not support op={op.name}"))
    pairs = [compression.compress(_tensor(t)) for t in tensors]
    xs = [p[0] for p in pairs]

    def forward(*ts: tf.Tensor) -> list[tf.Tensor]:
        return _run(lambda *a: core.reducescatter(a, op, name, process_set, prescale_factor,
                                                  postscale_factor),
                    ts, [t.dtype for t in ts], [_rest(t.shape) for t in ts])

    def backward(_ys: Any, *dys: tf.Tensor) -> list[tf.Tensor]:
        # Horovod's gradient: the gathered upstream gradient, times the set size for Sum.
        size = process_set.size() or core.size()
        outs = []
        for d in dys:
            d = tf.convert_to_tensor(d)
            if op == Sum:
                d = d * tf.cast(size, d.dtype)
            outs.append(allgather(d, process_set=process_set))
        return outs

    reduced = list(_custom(forward, backward, xs))
    return [compression.decompress(r, p[1]) for r, p in zip(reduced, pairs)]


def reducescatter(tensor: Any, device_dense: str = "",
                  compression: type[Compressor] = Compression.none, op: ReduceOp = Average,
                  name: str | None = None, process_set: ProcessSet = global_process_set,
                  prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> tf.Tensor:
    """Reduce `tensor` over the ranks and give each rank its rows of dimension 0."""
    return grouped_reducescatter([tensor], device_dense, compression, op, name, process_set,
                                 prescale_factor, postscale_factor)[0]


# -- join, barrier, size ops ----------------------------------------------------------

def join() -> int:
    """Wait until every rank has joined; returns the rank that joined last."""
    return _guarded(core.join)


def barrier(process_set: ProcessSet = global_process_set) -> None:
    """Block until every rank of the process set reaches the barrier."""
    _guarded(core.barrier, process_set)


def size_op(process_set_id: int = 0, name: str | None = None) -> tf.Tensor:
    """The number of ranks as a tensor (Horovod's graph-time query)."""
    return tf.constant(core.size(), dtype=tf.int32, name=name)


def rank_op(name: str | None = None) -> tf.Tensor:
    return tf.constant(core.rank(), dtype=tf.int32, name=name)


def local_rank_op(name: str | None = None) -> tf.Tensor:
    return tf.constant(core.local_rank(), dtype=tf.int32, name=name)


def local_size_op(name: str | None = None) -> tf.Tensor:
    return tf.constant(core.local_size(), dtype=tf.int32, name=name)
