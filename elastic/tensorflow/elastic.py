"""`hvd.elastic` for TensorFlow: run, State, ObjectState, TensorFlowState, TensorFlowKerasState.

The retry loop and the commit/restore/sync protocol are Horde's shared ones; this module
adds what is TensorFlow's: variables and Keras models as state, and turning the
`OpError` that TensorFlow raises for a failed collective inside `tf.function` back into
`HorovodInternalError` so that the loop rolls back and resets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from elastic.tensorflow import _core_bridge as core
from elastic.tensorflow._core_bridge import HorovodInternalError, HostsUpdatedInterrupt
from elastic.tensorflow.mpi_ops import horde_error_behind

State = core.State


class ObjectState(core.ObjectState):
    """Plain Python values as elastic state: `hvd.elastic.ObjectState(epoch=0, batch=0)`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(core.bcast_object_from_root, core.rank, core.check_host_updates,
                         **kwargs)


def _broadcast_from_root(variables: Sequence[tf.Variable]) -> None:
    from elastic.tensorflow.functions import broadcast_variables

    broadcast_variables(list(variables), root_rank=0)


class TensorFlowState(ObjectState):
    """Elastic state of a list of `tf.Variable`s plus plain values."""

    def __init__(self, variables: Sequence[tf.Variable] | None = None, **kwargs: Any) -> None:
        self.variables = list(variables or [])
        self._saved_values = [v.numpy() for v in self.variables]
        super().__init__(**kwargs)

    def save(self) -> None:
        self._saved_values = [v.numpy() for v in self.variables]
        super().save()

    def restore(self) -> None:
        for var, value in zip(self.variables, self._saved_values):
            var.assign(value)
        super().restore()

    def sync(self) -> None:
        if self.variables:
            _broadcast_from_root(self.variables)
        super().sync()


def _optimizer_variables(optimizer: Any, model: Any) -> list[tf.Variable]:
    """The optimizer's variables, built first if it has not taken a step yet (a newcomer's
    optimizer must have the same variables as the root's to receive them)."""
    if optimizer is None:
        return []
    if not getattr(optimizer, "built", True) and model is not None:
        optimizer.build(model.trainable_variables)
    return list(optimizer.variables)


class TensorFlowKerasState(ObjectState):
    """Elastic state of a Keras model (and optimizer) plus plain values such as epoch and
    batch: weights are saved in memory at each commit and broadcast from rank 0 on sync."""

    def __init__(self, model: Any, optimizer: Any = None, backend: Any = None,
                 **kwargs: Any) -> None:
        self.model = model
        self.optimizer = optimizer if optimizer is not None else getattr(model, "optimizer",
                                                                         None)
        self._saved_model: list[Any] = []
        self._saved_optimizer: list[Any] = []
        self._save_model()
        super().__init__(**kwargs)

    def _variables(self) -> tuple[list[tf.Variable], list[tf.Variable]]:
        return list(self.model.variables), _optimizer_variables(self.optimizer, self.model)

    def _save_model(self) -> None:
        model_vars, opt_vars = self._variables()
        self._saved_model = [v.numpy() for v in model_vars]
        self._saved_optimizer = [v.numpy() for v in opt_vars]

    def save(self) -> None:
        self._save_model()
        super().save()

    def restore(self) -> None:
        model_vars, opt_vars = self._variables()
        for var, value in zip(model_vars, self._saved_model):
            var.assign(value)
        for var, value in zip(opt_vars, self._saved_optimizer):
            var.assign(value)
        super().restore()

    def sync(self) -> None:
        model_vars, opt_vars = self._variables()
        _broadcast_from_root(model_vars + opt_vars)
        self._save_model()
        super().sync()


def run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: re-enter `func(state, ...)` after every membership change, in place."""

    @functools.wraps(func)
    def translated(state: State, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(state, *args, **kwargs)
        except tf.errors.OpError as exc:
            inner = horde_error_behind(exc)
            if inner is None:
                raise
            raise inner from exc

    return core.elastic_run(translated)


__all__ = ["run", "State", "ObjectState", "TensorFlowState", "TensorFlowKerasState",
           "HorovodInternalError", "HostsUpdatedInterrupt"]
