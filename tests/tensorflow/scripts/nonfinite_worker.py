"""One rank of the TensorFlow non-finite gradient tests under `horderun -np 2`.

Each rank trains a small Keras model with `hvd.DistributedOptimizer` via `model.fit` on
its own data; rank NAN_RANK's batches NAN_BATCHES ("3": batch 3; "3-": 3 and every later
one) hold a NaN input, so that rank's loss and gradient are NaN there. MODES lists the
runs ("graph": tf.function, "eager": run_eagerly=True; "tape": a tf.function loop with
`hvd.DistributedGradientTape` and `hvd.apply_gradients_if_finite`; "topk": graph with
`Compression.topk(0.5)`; "passes": graph with `backward_passes_per_step=2`). Writes
$OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import elastic.tensorflow.keras as hvd  # noqa: E402

BATCH, BATCHES = 8, 12


def nan_batches() -> set[int]:
    spec = os.environ.get("NAN_BATCHES", "")
    if not spec:
        return set()
    if spec.endswith("-"):
        return set(range(int(spec[:-1]), BATCHES))
    return {int(b) for b in spec.split(",")}


def train(mode: str) -> dict:
    keras.utils.set_random_seed(0)  # the same initial weights on every rank
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"),
                              keras.layers.Dense(1)])
    rng = np.random.default_rng(100 + hvd.rank())
    x = rng.normal(size=(BATCH * BATCHES, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    if hvd.rank() == int(os.environ.get("NAN_RANK", "1")):
        for b in nan_batches():
            x[b * BATCH, 0] = np.nan
    if mode == "tape":
        optimizer = keras.optimizers.SGD(0.05)

        @tf.function
        def step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(xb) - yb) ** 2)
            tape = hvd.DistributedGradientTape(tape)
            grads = tape.gradient(loss, model.trainable_variables)
            return hvd.apply_gradients_if_finite(optimizer,
                                                 zip(grads, model.trainable_variables))

        for b in range(BATCHES):
            step(x[b * BATCH:(b + 1) * BATCH], y[b * BATCH:(b + 1) * BATCH])
    else:
        compression = hvd.Compression.topk(0.5) if mode == "topk" else hvd.Compression.none
        passes = 2 if mode == "passes" else 1
        optimizer = hvd.DistributedOptimizer(keras.optimizers.SGD(0.05), compression=compression,
                                             backward_passes_per_step=passes)
        model.compile(optimizer=optimizer, loss="mse", run_eagerly=mode == "eager",
                      jit_compile=False)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    weights = [w.tolist() for w in model.get_weights()]
    return {"weights": weights,
            "finite": bool(all(np.isfinite(w).all() for w in model.get_weights())),
            "iterations": int(optimizer.iterations.numpy()),
            "skipped": getattr(optimizer, "nonfinite_skipped", None)}


hvd.init()
out = {mode: train(mode) for mode in os.environ.get("MODES", "graph").split(",")}
with open(os.path.join(os.environ["OUT"], f"rank{hvd.rank()}.json"), "w") as f:
    json.dump(out, f)
hvd.shutdown()
