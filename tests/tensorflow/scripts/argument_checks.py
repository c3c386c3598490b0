"""Bad arguments to elastic.tensorflow(.keras), in a world of one: prints {case: error} as JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import elastic.tensorflow.keras as hvd  # noqa: E402


def error_of(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the kind and message are the result
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def fit_stale_in_graph() -> None:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1), staleness=1),
                  loss="mse")
    model.fit(np.ones((4, 2), "float32"), np.ones((4, 1), "float32"), verbose=0)


def tape_grads(**kwargs: Any) -> Any:
    v, w = tf.Variable([1.0, 2.0]), tf.Variable([1.0], dtype=tf.float64)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(v * v) + tf.cast(tf.reduce_sum(w), tf.float32)
    return hvd.DistributedGradientTape(tape, **kwargs).gradient(loss, [v, w])


def schedule_without_steps() -> None:
    cb = hvd.callbacks.LearningRateScheduleCallback(0.1, 0.5, staircase=False)
    cb.set_params({})
    cb.on_train_begin()


hvd.init()
slices = tf.IndexedSlices(tf.constant([[1.0]]), tf.constant([0]))
cases = {
    "tape_not_a_tape": lambda: hvd.DistributedGradientTape("tape"),
    "predivide_with_sum": lambda: hvd.DistributedGradientTape(
        tf.GradientTape(), op=hvd.Sum, gradient_predivide_factor=2.0),
    "bad_compression": lambda: hvd.DistributedGradientTape(tf.GradientTape(),
                                                           compression="fp16"),
    "negative_num_groups": lambda: hvd.DistributedGradientTape(tf.GradientTape(),
                                                               num_groups=-1),
    "bad_groups": lambda: hvd.DistributedGradientTape(tf.GradientTape(), groups=[1, 2]),
    "optimizer_not_keras": lambda: hvd.DistributedOptimizer(object()),
    "backward_passes": lambda: hvd.DistributedOptimizer(keras.optimizers.SGD(),
                                                        backward_passes_per_step=0),
    "stale_and_passes": lambda: hvd.DistributedOptimizer(
        keras.optimizers.SGD(), backward_passes_per_step=2, staleness=1),
    "negative_staleness": lambda: hvd.DistributedOptimizer(keras.optimizers.SGD(),
                                                           staleness=-1),
    "staleness_in_graph": fit_stale_in_graph,
    "slices_min": lambda: hvd.allreduce(slices, op=hvd.Min),
    "slices_adasum": lambda: hvd.allreduce(slices, op=hvd.Adasum),
    "topk_sum": lambda: tape_grads(compression=hvd.Compression.topk(0.5), op=hvd.Sum),
    "topk_mixed_dtypes": lambda: tape_grads(compression=hvd.Compression.topk(0.5)),
    "topk_density": lambda: hvd.Compression.topk(0.0),
    "commit_every_0": lambda: hvd.elastic.CommitStateCallback(
        hvd.elastic.ObjectState(epoch=0, batch=0), batches_per_commit=0),
    "schedule_no_lr": lambda: hvd.callbacks.LearningRateScheduleCallback(None, 0.5),
    "schedule_no_steps": schedule_without_steps,
    "reducescatter_adasum": lambda: hvd.reducescatter(tf.ones([2]), op=hvd.Adasum),
    "not_a_process_set": lambda: hvd.allreduce(tf.ones([2]), process_set=[0]),
    "empty_group": lambda: hvd.grouped_allreduce([]),
    "negative_splits": lambda: hvd.alltoall(tf.ones([2]), splits=[-1]),
    "strings": lambda: hvd.allreduce(tf.constant(["a"])),
    "op_and_average": lambda: hvd.allreduce(tf.ones([2]), average=True, op=hvd.Sum),
    "global_variables": lambda: hvd.broadcast_global_variables(0),
}
result = {name: error_of(fn) for name, fn in cases.items()}
# and what still works afterwards, in the same world of one
result["after"] = hvd.allreduce(tf.constant([3.0])).numpy().tolist()
print("RESULT " + json.dumps(result), flush=True)
