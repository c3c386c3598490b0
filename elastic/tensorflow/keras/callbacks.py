"""Horovod's Keras callbacks: broadcast the initial state, average metrics, schedule the
learning rate (with warm-up), for Keras 3 on TensorFlow."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.utils.io_utils import print_msg

from elastic.tensorflow import _core_bridge as core
from elastic.tensorflow.functions import broadcast_variables
from elastic.tensorflow.mpi_ops import Average, grouped_allreduce

logger = logging.getLogger(__name__)


def _optimizer_variables(model: Any) -> list[Any]:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return []
    if not getattr(optimizer, "built", True):
        optimizer.build(model.trainable_variables)
    return list(optimizer.variables)


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Make every rank start from rank `root_rank`'s model and optimizer state.

    As Horovod, it broadcasts the model's and the optimizer's variables after the first
    batch; Horde also broadcasts the model's variables before it, so that the first
    step's gradients are computed on the same weights everywhere.
    """

    def __init__(self, root_rank: int = 0, device: str = "") -> None:
        super().__init__()
        self.root_rank = root_rank
        self.device = device
        self.broadcast_done = False

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.broadcast_done:
            broadcast_variables(self.model.variables, root_rank=self.root_rank)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.broadcast_done:
            return
        broadcast_variables(list(self.model.variables) + _optimizer_variables(self.model),
                            root_rank=self.root_rank)
        self.broadcast_done = True


class MetricAverageCallback(keras.callbacks.Callback):
    """Average the epoch's metrics over the ranks, in place in `logs`.

    Put it before callbacks that read the metrics (checkpointing, early stopping).
    """

    def __init__(self, device: str = "") -> None:
        super().__init__()
        self.device = device

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not logs:
            return
        names = sorted(k for k, v in logs.items() if np.ndim(v) == 0
                       and isinstance(np.asarray(v).item(), (int, float)))
        if not names:
            return
        values = [tf.constant([float(np.asarray(logs[k]))], tf.float64) for k in names]
        reduced = grouped_allreduce(values, op=Average,
                                    name="MetricAverageCallback." + ",".join(names))
        for key, value in zip(names, reduced):
            logs[key] = float(value.numpy()[0])


def _get_lr(optimizer: Any) -> float:
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Set the learning rate to `initial_lr * multiplier(epoch)` in [start_epoch, end_epoch).

    A constant `multiplier` means `multiplier ** epoch`. With `staircase=True` the rate
    changes at the start of each epoch, otherwise at every batch with a fractional
    epoch. Keras 3 compiles the momentum of its optimizers into the training step, so
    `momentum_correction` is accepted but has no effect.
    """

    def __init__(self, initial_lr: float, multiplier: float | Callable[[float], float],
                 start_epoch: int = 0, end_epoch: int | None = None, staircase: bool = True,
                 momentum_correction: bool = True, steps_per_epoch: int | None = None) -> None:
        super().__init__()
        if initial_lr is None:
            raise ValueError("Parameter `initial_lr` is required")
        self.initial_lr = float(initial_lr)
        self.multiplier: Callable[[float], float] = (
            multiplier if callable(multiplier) else (lambda epoch: multiplier ** epoch))
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.staircase = staircase
        self.momentum_correction = momentum_correction
        self.steps_per_epoch = steps_per_epoch
        self.current_epoch = 0

    def _steps(self) -> int:
        steps = (self.params or {}).get("steps")
        if steps:
            return int(steps)
        raise ValueError(f"Could not find the number of steps per epoch; pass "
                         f"steps_per_epoch= to {type(self).__name__}()")

    def _in_scope(self) -> bool:
        return self.current_epoch >= self.start_epoch and (
            self.end_epoch is None or self.current_epoch < self.end_epoch)

    def _set(self, epoch: float) -> None:
        self.model.optimizer.learning_rate = self.initial_lr * self.multiplier(epoch)

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.staircase and not self.steps_per_epoch:
            self.steps_per_epoch = self._steps()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.current_epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if not self._in_scope():
            return
        if self.staircase:
            if batch == 0:
                self._set(self.current_epoch)
        else:
            self._set(self.current_epoch + batch / self.steps_per_epoch)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["lr"] = _get_lr(self.model.optimizer)


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Ramp the learning rate from `initial_lr / size` to `initial_lr` over
    `warmup_epochs` epochs, batch by batch (Goyal et al.'s gradual warm-up)."""

    def __init__(self, initial_lr: float, warmup_epochs: int = 5,
                 momentum_correction: bool = True, steps_per_epoch: int | None = None,
                 verbose: int = 0) -> None:
        def multiplier(epoch: float) -> float:
            # Shifted by one batch so that each epoch ends on a round value.
            epoch += 1.0 / self.steps_per_epoch  # type: ignore[operator]
            n = core.size()
            return 1.0 / n * (epoch * (n - 1) / warmup_epochs + 1)

        super().__init__(initial_lr, multiplier, start_epoch=0, end_epoch=warmup_epochs,
                         staircase=False, momentum_correction=momentum_correction,
                         steps_per_epoch=steps_per_epoch)
        self.warmup_epochs = warmup_epochs
        self.verbose = verbose

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        if epoch == self.warmup_epochs - 1 and self.verbose > 0 and core.rank() == 0:
            print_msg(
                f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to "
                f"{_get_lr(self.model.optimizer):g}.")


__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback",
           "LearningRateScheduleCallback", "LearningRateWarmupCallback"]
