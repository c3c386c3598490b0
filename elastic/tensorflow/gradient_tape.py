"""Gradient averaging for TensorFlow: Horovod's `DistributedGradientTape`, and the
reducer it shares with the Keras `DistributedOptimizer`.

Dense gradients go in one fused allreduce (or `num_groups` of them); `tf.IndexedSlices`
are allgathered (or densified with `sparse_as_dense=True`). With
`compression=hvd.Compression.topk(d)` the gradients go through Horde's shared top-k
exchange with error feedback instead (the same code as the PyTorch optimizer's).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from elastic.tensorflow import _core_bridge as core
from elastic.tensorflow._core_bridge import ProcessSet, ReduceOp, TopKCompression
from elastic.tensorflow.compression import Compression, Compressor
from elastic.tensorflow.mpi_ops import Adasum, Average, _run, grouped_allreduce

logger = logging.getLogger(__name__)


class GradientReducer:
    """Averages (or sums) a list of gradients over a process set, as Horovod does."""

    def __init__(self, compression: Any = Compression.none, sparse_as_dense: bool = False,
                 op: ReduceOp = Average, gradient_predivide_factor: float = 1.0,
                 num_groups: int = 0, groups: Sequence[Sequence[Any]] | int | None = None,
                 process_set: ProcessSet = core.global_process_set,
                 scale_local_gradients: bool = True) -> None:
        op = ReduceOp(int(op))
        if gradient_predivide_factor != 1.0 and op != Average:
            raise ValueError("gradient_predivide_factor not supported with op != Average")
        if op == Adasum and gradient_predivide_factor != 1.0:
            raise ValueError("gradient_predivide_factor not supported with op=Adasum")
        if isinstance(groups, int):
            num_groups, groups = groups, None
        if num_groups < 0:
            raise ValueError(f"num_groups={num_groups} must not be negative")
        if groups is not None and not all(isinstance(g, (list, tuple)) for g in groups):
            raise ValueError("groups must be a list of lists of variables")
        self.topk = compression if isinstance(compression, TopKCompression) else None
        if self.topk is None and not (isinstance(compression, type)
                                      and issubclass(compression, Compressor)):
            raise ValueError(f"compression={compression!r} is not hvd.Compression.none, "
                             ".fp16 or .topk(density)")
        self.compression: type[Compressor] = (Compression.none if self.topk is not None
                                              else compression)
        self.sparse_as_dense = sparse_as_dense
        self.op = op
        self.predivide = float(gradient_predivide_factor)
        self.num_groups = num_groups
        self.groups = groups
        self.process_set = process_set
        self.scale_local_gradients = scale_local_gradients
        self._sparse: core.SparseAllreduce | None = None

    def reduce(self, grads: Sequence[Any], variables: Sequence[Any] | None = None) -> list[Any]:
        """The reduced gradients, in order; None stays None (the same on every rank)."""
        grads = list(grads)
        if not self.process_set.included():
            return grads
        if self.sparse_as_dense:
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                     for g in grads]
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return grads
        if self.topk is not None:
            reduced = self._reduce_topk([grads[i] for i in present])
        else:
            reduced = []
            for chunk in self._chunks(present, variables):
                reduced.extend(zip(chunk, self._reduce_dense([grads[i] for i in chunk])))
            reduced = [g for _, g in sorted(reduced, key=lambda item: item[0])]
        out = list(grads)
        for i, g in zip(present, reduced):
            out[i] = g
        if self.process_set.process_set_id == 0:
            self._credit(out[present[0]])
        return out

    @staticmethod
    def _credit(after: Any) -> None:
        """Credit the step once its reduction is done (`after`: one reduced gradient);
        inside `tf.function` a stateful py_function, which TensorFlow runs every step."""
        def report(*_: Any) -> list[Any]:
            core.report_synchronous_step()
            return []

        if tf.executing_eagerly():
            report()
        else:
            anchor = after.values if isinstance(after, tf.IndexedSlices) else after
            tf.py_function(func=report, inp=[anchor], Tout=[])

    def _chunks(self, present: list[int], variables: Sequence[Any] | None) -> list[list[int]]:
        if self.groups is not None and variables is not None:
            ids = {id(v): n for n, group in enumerate(self.groups) for v in group}
            by_group: dict[int, list[int]] = {}
            for i in present:
                by_group.setdefault(ids.get(id(variables[i]), -1), []).append(i)
            return [by_group[k] for k in sorted(by_group)]
        if self.num_groups > 0:
            parts = np.array_split(np.array(present), min(self.num_groups, len(present)))
            return [[int(i) for i in part] for part in parts if len(part)]
        return [present]

    def _reduce_dense(self, grads: list[Any]) -> list[Any]:
        prescale, postscale = 1.0, 1.0
        if self.op == Average and self.predivide != 1.0:
            prescale, postscale = 1.0 / self.predivide, self.predivide
        return grouped_allreduce(grads, compression=self.compression, op=self.op,
                                 prescale_factor=prescale, postscale_factor=postscale,
                                 process_set=self.process_set)

    def _reduce_topk(self, grads: list[Any]) -> list[Any]:
        """Horde's shared top-k exchange (allgather of sparse payloads, error feedback)."""
        if self.op != Average:
            raise ValueError("Compression.topk averages gradients; use op=hvd.Average")
        dense = [tf.convert_to_tensor(g) for g in grads]
        dtypes = {g.dtype for g in dense}
        if len(dtypes) != 1:
            raise ValueError(f"Compression.topk needs one gradient dtype, got {dtypes}")
        if self._sparse is None:
            shapes = [tuple(g.shape.as_list()) for g in dense]
            if any(d is None for s in shapes for d in s):
                raise ValueError("Compression.topk needs gradients of known shapes")
            self._sparse = core.SparseAllreduce(shapes, dense[0].dtype.as_numpy_dtype,
                                                self.topk, self.process_set)
        sparse = self._sparse

        def fn(*arrays: np.ndarray) -> list[np.ndarray]:
            return [np.array(a, copy=True) for a in sparse.reduce(arrays)]

        return _run(fn, dense, [g.dtype for g in dense], [g.shape for g in dense])

    @property
    def stats(self) -> Any:
        """Top-k communication counts (None with dense compression)."""
        return self._sparse.stats if self._sparse is not None else None


class NonFiniteGuard:
    """Skips a step whose reduced gradient holds NaN/Inf, as the PyTorch optimizer does.

    The reduced gradient is the same on every rank of the set, so every rank skips the
    same steps; after HORDE_MAX_NONFINITE_STEPS in a row it raises NonFiniteGradientError.
    """

    def __init__(self, process_set: ProcessSet = core.global_process_set) -> None:
        self.process_set = process_set
        self.run = 0  # consecutive steps skipped as non-finite
        self.skipped = 0

    def enabled(self) -> bool:
        """Whether steps are checked (HORDE_MAX_NONFINITE_STEPS > 0, on a member of the set)."""
        return core.max_nonfinite_steps() > 0 and self.process_set.included()

    def decide(self, finite: Sequence[bool], names: Sequence[str]) -> bool:
        """Whether to apply the step, given each reduced gradient's finiteness; counts
        skips, warns, and raises NonFiniteGradientError at the limit."""
        limit = core.max_nonfinite_steps()
        bad = next((i for i, ok in enumerate(finite) if not bool(ok)), None)
        if bad is None:
            self.run = 0
            return True
        self.run += 1
        self.skipped += 1
        name = names[bad] if bad < len(names) else "a variable"
        if self.run >= limit:
            raise core.NonFiniteGradientError(
                f"the averaged gradient was non-finite (NaN/Inf) in {self.run} steps in a "
                f"row (last: of {name!r}); every rank skipped them and the job stops: a "
                "rank's loss or data went bad, or the learning rate is too high. Check the "
                "inputs and the learning rate, or resume from a checkpoint "
                f"(HORDE_MAX_NONFINITE_STEPS={limit} sets how many such steps are skipped "
                "first; 0 never skips)")
        logger.warning("skipped an optimizer step on every rank: the averaged gradient of %r "
                       "is non-finite (NaN/Inf), from some rank's loss or data (%d in a row; "
                       "the job stops at %d)", name, self.run, limit)
        return False

    def should_apply(self, grads: Sequence[Any], variables: Sequence[Any]) -> Any:
        """True (a Python bool eagerly, a scalar tensor inside tf.function) when `grads`,
        already reduced, are all finite or the check is off; None gradients are ignored."""
        if not self.enabled():
            return True
        present = [(g.values if isinstance(g, tf.IndexedSlices) else g, v)
                   for g, v in zip(grads, variables) if g is not None]
        if not present:
            return True
        names = [str(getattr(v, "path", None) or getattr(v, "name", "a variable"))
                 for _, v in present]
        finite = tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g, _ in present])
        if tf.executing_eagerly():
            return self.decide(finite.numpy().tolist(), names)

        def check(flags: tf.Tensor) -> tf.Tensor:
            return tf.constant(self.decide(flags.numpy().tolist(), names))

        # A stateful py_function: TensorFlow runs it on every step of the traced function.
        (ok,) = tf.py_function(func=check, inp=[finite], Tout=[tf.bool])
        ok.set_shape(())
        return ok


class _DistributedGradientTape(tf.GradientTape):
    """A GradientTape whose `gradient()` returns gradients reduced over the ranks."""

    def __init__(self, tape: tf.GradientTape, reducer: GradientReducer) -> None:
        # Share the wrapped tape's recording (no super().__init__: it would start anew).
        self.__dict__.update(tape.__dict__)
        self._horde_reducer = reducer

    def gradient(self, target: Any, sources: Any, output_gradients: Any = None,
                 unconnected_gradients: Any = tf.UnconnectedGradients.NONE,
                 use_generic_names: bool = False) -> Any:
        """The gradients of `target` averaged over the ranks (Horovod's semantics)."""
        grads = super().gradient(target, sources, output_gradients, unconnected_gradients)
        flat = tf.nest.flatten(grads)
        flat_sources = tf.nest.flatten(sources)
        reduced = self._horde_reducer.reduce(flat, flat_sources)
        return tf.nest.pack_sequence_as(grads, reduced)


def DistributedGradientTape(gradtape: tf.GradientTape, device_dense: str = "",  # noqa: N802
                            device_sparse: str = "",
                            compression: Any = Compression.none,
                            sparse_as_dense: bool = False, op: ReduceOp = Average,
                            gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                            groups: Any = None,
                            process_set: ProcessSet = core.global_process_set,
                            scale_local_gradients: bool = True) -> tf.GradientTape:
    """Wrap `gradtape` so that `gradient()` averages the gradients over the ranks.

    Arguments as Horovod's; `compression` also takes `hvd.Compression.topk(density)`.
    """
    if not isinstance(gradtape, tf.GradientTape):
        raise ValueError(f"DistributedGradientTape wraps a tf.GradientTape, got "
                         f"{type(gradtape).__name__}")
    reducer = GradientReducer(compression, sparse_as_dense, op, gradient_predivide_factor,
                              num_groups, groups, process_set, scale_local_gradients)
    return _DistributedGradientTape(gradtape, reducer)


_tape_guards: weakref.WeakKeyDictionary[Any, NonFiniteGuard] = weakref.WeakKeyDictionary()


def apply_gradients_if_finite(optimizer: Any, grads_and_vars: Any,
                              process_set: ProcessSet = core.global_process_set) -> Any:
    """`optimizer.apply_gradients(grads_and_vars)` unless a gradient (reduced by
    `DistributedGradientTape`, so the same on every rank) holds NaN/Inf: then the step is
    skipped on every rank; NonFiniteGradientError after HORDE_MAX_NONFINITE_STEPS in a row.
    Returns whether it applied (a bool tensor inside tf.function)."""
    pairs = list(grads_and_vars)
    grads = [g for g, _ in pairs]
    variables = [v for _, v in pairs]
    guard = _tape_guards.get(optimizer)
    if guard is None:
        guard = _tape_guards[optimizer] = NonFiniteGuard(process_set)
    ok = guard.should_apply(grads, variables)
    if isinstance(ok, bool):
        if ok:
            optimizer.apply_gradients(pairs)
        return ok
    if not getattr(optimizer, "built", True):
        with tf.init_scope():  # the optimizer's variables are not made inside a branch
            optimizer.build(variables)

    def apply() -> tf.Tensor:
        optimizer.apply_gradients(pairs)
        return tf.constant(True)

    return tf.cond(ok, apply, lambda: tf.constant(False))


__all__ = ["DistributedGradientTape", "GradientReducer", "NonFiniteGuard",
           "apply_gradients_if_finite"]
