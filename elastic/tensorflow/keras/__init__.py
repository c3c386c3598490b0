"""Horovod's Keras API on Horde for Keras 3 / TensorFlow 2: `import elastic.tensorflow.keras
as hvd`. Everything in `elastic.tensorflow`, plus the Keras `DistributedOptimizer`, the
callbacks and `hvd.elastic` with Keras state and callbacks."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from elastic.tensorflow import *  # noqa: F403 - the same API as elastic.tensorflow
from elastic.tensorflow import __all__ as _tf_all
from elastic.tensorflow import _core_bridge as core
from elastic.tensorflow.compression import Compression
from elastic.tensorflow.gradient_tape import GradientReducer, NonFiniteGuard
from elastic.tensorflow.keras import callbacks
from elastic.tensorflow.mpi_ops import Average, ReduceOp

# The star import bound `elastic` to elastic.tensorflow.elastic; Keras users get the
# Keras flavour (KerasState and the callbacks), as in Horovod.
elastic = importlib.import_module("elastic.tensorflow.keras.elastic")


class _DistributedOptimizer:
    """Mixin placed before the wrapped Keras optimizer's class: `apply()` (which
    `apply_gradients()` and `model.fit` go through) first reduces the gradients, and skips
    a synchronous step whose reduced gradient holds NaN/Inf on every rank."""

    _horde_reducer: GradientReducer
    _horde_guard: NonFiniteGuard
    _horde_staleness: int = 0
    _horde_stale: Any = None
    _horde_passes: int = 1
    _horde_average_passes: bool = False
    _horde_sums: list[Any] | None = None
    _horde_count: Any = None

    def apply(self, grads: Sequence[Any], trainable_variables: Sequence[Any] | None = None
              ) -> Any:
        grads = list(grads)
        variables = (list(trainable_variables) if trainable_variables is not None
                     else list(getattr(self, "_trainable_variables", [])))
        if self._horde_staleness > 0:
            return self._horde_apply_stale(grads, trainable_variables, variables)
        if self._horde_passes > 1:
            return self._horde_apply_aggregated(grads, variables)
        reduced = self._horde_reducer.reduce(grads, variables)
        return self._horde_apply_finite(reduced, trainable_variables, variables)

    def _horde_apply_finite(self, reduced: list[Any], trainable_variables: Any,
                            variables: list[Any]) -> Any:
        """Apply the reduced gradients unless one holds NaN/Inf (then skip the step: every
        rank holds the same reduction, so every rank skips it); a graph conditional inside
        tf.function, as Keras' LossScaleOptimizer does."""
        ok = self._horde_guard.should_apply(reduced, variables)
        parent = super()
        if ok is True:
            return parent.apply(reduced, trainable_variables)  # type: ignore[misc]
        if ok is False:
            return None
        if not getattr(self, "built", True):
            with tf.init_scope():  # the optimizer's variables are not made inside a branch
                self.build(variables)  # type: ignore[attr-defined]

        def apply() -> tf.Tensor:
            parent.apply(reduced, trainable_variables)  # type: ignore[misc]
            return tf.constant(True)

        return tf.cond(ok, apply, lambda: tf.constant(False))

    def _horde_apply_aggregated(self, grads: list[Any], variables: list[Any]) -> None:
        """`backward_passes_per_step=N`: add this pass's gradients to local sums; every Nth
        pass reduce the sums over the ranks (divided by N with average_aggregated_gradients)
        and apply them. Every rank counts alike, so all take the same branch."""
        if any(isinstance(g, tf.IndexedSlices) for g in grads):
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                     for g in grads]
        if self._horde_sums is None:
            with tf.init_scope():  # created once, outside the traced training step
                self._horde_sums = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False)
                                    for v in variables]
                self._horde_count = tf.Variable(0, dtype=tf.int64, trainable=False)
        for total, g in zip(self._horde_sums, grads):
            if g is not None:
                total.assign_add(tf.cast(g, total.dtype))
        count = self._horde_count.assign_add(1)

        def reduce_and_apply() -> tf.Tensor:
            scale = 1.0 / self._horde_passes if self._horde_average_passes else 1.0
            summed = [tf.convert_to_tensor(t) * scale for t in self._horde_sums]
            reduced = self._horde_reducer.reduce(summed, variables)
            self._horde_apply_finite(reduced, variables, variables)
            with tf.control_dependencies([r for r in reduced if r is not None]):
                for total in self._horde_sums:
                    total.assign(tf.zeros_like(total))
            return tf.constant(True)

        tf.cond(count % self._horde_passes == 0, reduce_and_apply,
                lambda: tf.constant(False))

    def _horde_apply_stale(self, grads: list[Any], trainable_variables: Any,
                           variables: list[Any]) -> None:
        """Bounded staleness (Horde's addition): submit this step's gradients to the shared
        rounds and apply every aggregate that finished, in the same order everywhere."""
        if not tf.executing_eagerly():
            raise ValueError("DistributedOptimizer(staleness>0) applies a varying number of "
                             "aggregates per step; compile the model with run_eagerly=True")
        if not getattr(self, "built", True):
            self.build(variables)  # type: ignore[attr-defined]
        dense = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                 for g, v in zip(grads, variables)]
        if self._horde_stale is None:
            spec = self._horde_reducer.topk
            self._horde_stale = core.StaleAllreduce(
                [tuple(g.shape.as_list()) for g in dense], dense[0].dtype.as_numpy_dtype,
                spec, self._horde_staleness, self._horde_reducer.process_set)
        self._horde_stale.step([g.numpy() for g in dense], 1, self._horde_apply_aggregate,
                               **self._horde_kind())

    def _horde_kind(self) -> dict[str, Any]:
        """What the staleness rounds need to know of this optimizer: momentum (SGD's
        `momentum`, Adam's `beta_1`), whether it is adaptive (Adam and kin), and its rate."""
        momentum = float(getattr(self, "momentum", 0.0) or 0.0) > 0 or \
            float(getattr(self, "beta_1", 0.0) or 0.0) > 0
        return {"momentum": momentum, "adaptive": hasattr(self, "beta_2"),
                "lr": self._horde_lr}

    def _horde_lr(self) -> float | None:
        """The learning rate now, or None for a schedule (it is a function of the step)."""
        if isinstance(getattr(self, "_learning_rate", None),
                      keras.optimizers.schedules.LearningRateSchedule):
            return None
        return float(keras.ops.convert_to_numpy(self.learning_rate))  # type: ignore[attr-defined]

    def _horde_apply_aggregate(self, aggregate: list[Any], lr_factor: float = 1.0,
                               lr: float | None = None) -> None:
        """One step of the wrapped optimizer on a finished round's aggregate, with the
        round's agreed learning rate `lr` (None: its own) times `lr_factor`."""
        variables = list(getattr(self, "_trainable_variables", []))
        grads = [tf.constant(a) for a in aggregate]
        saved = self._horde_lr()
        scaled = saved is not None and (lr_factor != 1.0 or (lr is not None and lr != saved))
        if scaled:
            self.learning_rate = (saved if lr is None else lr) * lr_factor  # type: ignore[attr-defined]
        try:
            super().apply(grads, variables)  # type: ignore[misc]
        finally:
            if scaled:
                self.learning_rate = saved  # type: ignore[attr-defined]

    @property
    def nonfinite_skipped(self) -> int:
        """How many synchronous steps were skipped because their reduced gradient held
        NaN/Inf (the same count on every rank)."""
        return self._horde_guard.skipped

    def finish(self) -> None:
        """Staleness: apply what is still in flight (every rank together)."""
        if self._horde_stale is not None:
            self._horde_stale.finish(self._horde_apply_aggregate, **self._horde_kind())


def DistributedOptimizer(optimizer: Any, name: str | None = None,  # noqa: N802
                         device_dense: str = "", device_sparse: str = "",
                         compression: Any = Compression.none, sparse_as_dense: bool = False,
                         gradient_predivide_factor: float = 1.0, op: ReduceOp = Average,
                         backward_passes_per_step: int = 1,
                         average_aggregated_gradients: bool = False, num_groups: int = 0,
                         groups: Any = None,
                         process_set: core.ProcessSet = core.global_process_set,
                         scale_local_gradients: bool = True, staleness: int = 0) -> Any:
    """A copy of the Keras `optimizer` that averages gradients over the ranks before
    applying them (Horovod's arguments; `compression` also takes
    `hvd.Compression.topk(d)`, and `staleness=S` runs bounded-staleness rounds)."""
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(f"DistributedOptimizer wraps a keras.optimizers.Optimizer, got "
                         f"{type(optimizer).__name__}")
    if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step={backward_passes_per_step!r} must be an "
                         "integer >= 1")
    if staleness < 0:
        raise ValueError(f"staleness={staleness} must be >= 0")
    if staleness > 0 and backward_passes_per_step > 1:
        raise ValueError("staleness > 0 and backward_passes_per_step > 1 cannot be combined")
    reducer = GradientReducer(compression, sparse_as_dense, op, gradient_predivide_factor,
                              num_groups, groups, process_set, scale_local_gradients)
    base = type(optimizer)
    cls = type(base.__name__, (_DistributedOptimizer, base), {})
    config = optimizer.get_config()
    if name is not None:
        config["name"] = name
    distributed = cls.from_config(config)
    distributed._horde_reducer = reducer
    distributed._horde_guard = NonFiniteGuard(process_set)
    distributed._horde_staleness = int(staleness)
    distributed._horde_passes = backward_passes_per_step
    distributed._horde_average_passes = bool(average_aggregated_gradients)
    return distributed


def broadcast_global_variables(root_rank: int) -> Any:
    """Not available in TensorFlow 2 (no global variables); as in Horovod."""
    raise RuntimeError("hvd.broadcast_global_variables() does not support eager execution; "
                       "use hvd.broadcast_variables(model.variables, root_rank)")


def load_model(filepath: str, custom_optimizers: Sequence[type] | None = None,
               custom_objects: dict[str, Any] | None = None,
               compression: Any = Compression.none) -> Any:
    """Load a saved Keras model and wrap its optimizer in `DistributedOptimizer`."""
    model = keras.models.load_model(filepath, custom_objects=custom_objects, compile=True)
    if getattr(model, "optimizer", None) is not None:
        model.optimizer = DistributedOptimizer(model.optimizer, compression=compression)
    return model


__all__ = [*_tf_all, "DistributedOptimizer", "callbacks", "elastic",
           "broadcast_global_variables", "load_model"]
