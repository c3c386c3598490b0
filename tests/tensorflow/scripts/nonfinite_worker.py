"""One rank of the TensorFlow non-finite gradient tests under `horderun -np 2`.

Each rank trains a small Keras model with `hvd.DistributedOptimizer` via `model.fit` on
its own data; rank NAN_RANK's batches NAN_BATCHES ("3": batch 3; "3-": 3 and every later
one) hold a NaN input, so that rank's loss and gradient are NaN there. MODES lists the
runs ("graph": tf.function, "eager": run_eagerly=True; "tape": a tf.function loop with
`hvd.DistributedGradientTape` and `hvd.apply_gradients_if_finite`; "topk": graph with
`Compression.topk(0.5)`, which is dense for two ranks; "passes": graph with
`backward_passes_per_step=2`; "sparse": graph with a genuinely sparse
`Compression.topk(0.1, min_sparse_numel=16)` (the last bias travels dense);
"sparse_all": the same with every gradient sparse (`min_sparse_numel=0`);
"sparse_tape": the tape loop with sparse top-k). Writes $OUT/rank<r>.json (with the
top-k counts of the sparse modes).
"""

from __future__ import annotations

import json
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import elastic.tensorflow.keras as hvd  # noqa: E402
from elastic.tensorflow import gradient_tape  # noqa: E402

BATCH, BATCHES = 8, 12


def nan_batches() -> set[int]:
    spec = os.environ.get("NAN_BATCHES", "")
    if not spec:
        return set()
    if spec.endswith("-"):
        return set(range(int(spec[:-1]), BATCHES))
    return {int(b) for b in spec.split(",")}


SPARSE = {"sparse": 16, "sparse_all": 0, "sparse_tape": 16}  # mode -> min_sparse_numel


def compression_for(mode: str) -> object:
    if mode in SPARSE:
        return hvd.Compression.topk(0.1, min_sparse_numel=SPARSE[mode])
    return hvd.Compression.topk(0.5) if mode == "topk" else hvd.Compression.none


def train(mode: str) -> dict:
    keras.utils.set_random_seed(0)  # the same initial weights on every rank
    hidden = 16 if mode in SPARSE else 3  # sparse: kernels and a bias of >= 16 values
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(hidden, activation="tanh"),
                              keras.layers.Dense(1)])
    rng = np.random.default_rng(100 + hvd.rank())
    x = rng.normal(size=(BATCH * BATCHES, 4)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    if hvd.rank() == int(os.environ.get("NAN_RANK", "1")):
        for b in nan_batches():
            x[b * BATCH, 0] = np.nan
    reducer = None
    if mode in ("tape", "sparse_tape"):
        optimizer = keras.optimizers.SGD(0.05)
        traced: list = []  # the tape's reducer, made when the step is traced

        @tf.function
        def step(xb: tf.Tensor, yb: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(xb) - yb) ** 2)
            tape = hvd.DistributedGradientTape(tape, compression=compression_for(mode))
            traced.append(tape._horde_reducer)
            grads = tape.gradient(loss, model.trainable_variables)
            return hvd.apply_gradients_if_finite(optimizer,
                                                 zip(grads, model.trainable_variables))

        for b in range(BATCHES):
            step(x[b * BATCH:(b + 1) * BATCH], y[b * BATCH:(b + 1) * BATCH])
        reducer = traced[-1]
        skipped = gradient_tape._tape_guards[optimizer].skipped
    else:
        compression = compression_for(mode)
        passes = 2 if mode == "passes" else 1
        optimizer = hvd.DistributedOptimizer(keras.optimizers.SGD(0.05), compression=compression,
                                             backward_passes_per_step=passes)
        model.compile(optimizer=optimizer, loss="mse", run_eagerly=mode == "eager",
                      jit_compile=False)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        reducer = optimizer._horde_reducer
        skipped = optimizer.nonfinite_skipped
    stats = reducer.stats if reducer is not None else None
    weights = [w.tolist() for w in model.get_weights()]
    return {"weights": weights,
            "finite": bool(all(np.isfinite(w).all() for w in model.get_weights())),
            "iterations": int(optimizer.iterations.numpy()),
            "skipped": skipped,
            "topk": stats.as_dict() if stats is not None else None}


hvd.init()
out = {mode: train(mode) for mode in os.environ.get("MODES", "graph").split(",")}
with open(os.path.join(os.environ["OUT"], f"rank{hvd.rank()}.json"), "w") as f:
    json.dump(out, f)
hvd.shutdown()
