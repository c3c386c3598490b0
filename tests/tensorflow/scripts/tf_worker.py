"""One rank of the `elastic.tensorflow` suite under `horderun -np 2`.

Every check runs on every rank and records {"ok", "value"} (or the error) in
$OUT/rank<r>.json; the test compares the ranks. The PyTorch frontend runs in the same
process on the same inputs, so each TensorFlow collective is compared with it directly.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

import elastic.tensorflow.keras as hvd  # noqa: E402
import elastic.torch as thvd  # noqa: E402

results: dict[str, Any] = {}


def check(fn: Callable[[], Any]) -> Callable[[], Any]:
    try:
        results[fn.__name__] = {"ok": True, "value": fn()}
    except Exception as exc:  # noqa: BLE001 - recorded for the test to show
        results[fn.__name__] = {"ok": False, "error": "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__))}
    return fn


hvd.init()
R, N = hvd.rank(), hvd.size()
rng = np.random.default_rng(100 + R)


def same(tf_value: Any, torch_value: Any, what: str) -> None:
    a = tf_value.numpy() if hasattr(tf_value, "numpy") else np.asarray(tf_value)
    b = torch_value.numpy() if isinstance(torch_value, torch.Tensor) else np.asarray(torch_value)
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (
        f"{what}: TensorFlow {a.dtype}{a.shape} {a.ravel()[:6]} != PyTorch "
        f"{b.dtype}{b.shape} {b.ravel()[:6]}")


def data(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-5, 6, shape).astype(dtype)


# -- collectives against the PyTorch frontend -----------------------------------------

@check
def collectives_match_torch() -> int:
    compared = 0
    ops = [(hvd.Average, thvd.Average), (hvd.Sum, thvd.Sum), (hvd.Min, thvd.Min),
           (hvd.Max, thvd.Max), (hvd.Product, thvd.Product)]
    graph_allreduce = tf.function(lambda x, op: hvd.allreduce(x, op=op))
    for dtype in ("float32", "float64", "int32", "int64"):
        x = data((3, 5), dtype)
        for op, top in ops:
            expect = thvd.allreduce(torch.from_numpy(x.copy()), op=top)
            same(hvd.allreduce(tf.constant(x), op=op), expect, f"allreduce {op} {dtype}")
            same(graph_allreduce(tf.constant(x), op), expect, f"graph allreduce {op} {dtype}")
            compared += 2
        pre = hvd.allreduce(tf.constant(x), op=hvd.Sum, prescale_factor=0.5,
                            postscale_factor=3.0)
        same(pre, thvd.allreduce(torch.from_numpy(x.copy()), op=thvd.Sum, prescale_factor=0.5,
                                 postscale_factor=3.0), f"scaled allreduce {dtype}")
        ys = [data((4,), dtype), data((2, 2), dtype)]
        got = hvd.grouped_allreduce([tf.constant(y) for y in ys], op=hvd.Sum)
        want = thvd.grouped_allreduce([torch.from_numpy(y.copy()) for y in ys], op=thvd.Sum)
        for g, w in zip(got, want):
            same(g, w, f"grouped_allreduce {dtype}")
        uneven = data((R + 1, 3), dtype)
        expect = thvd.allgather(torch.from_numpy(uneven.copy()))
        same(hvd.allgather(tf.constant(uneven)), expect, f"allgather {dtype}")
        same(tf.function(hvd.allgather)(tf.constant(uneven)), expect, f"graph allgather {dtype}")
        b = data((2, 3), dtype)
        same(hvd.broadcast(tf.constant(b), 1), thvd.broadcast(torch.from_numpy(b.copy()), 1),
             f"broadcast {dtype}")
        a = data((5, 2), dtype)
        splits = [1, 4] if R == 0 else [3, 2]
        out, recv = hvd.alltoall(tf.constant(a), splits=splits)
        tout, trecv = thvd.alltoall(torch.from_numpy(a.copy()), splits=splits)
        same(out, tout, f"alltoall {dtype}")
        same(recv, trecv, f"alltoall received splits {dtype}")
        even = data((4, 3), dtype)
        same(hvd.alltoall(tf.constant(even)), thvd.alltoall(torch.from_numpy(even.copy())),
             f"alltoall without splits {dtype}")
        rs = data((5, 2), dtype)
        for op, top in ops[:2]:
            same(hvd.reducescatter(tf.constant(rs), op=op),
                 thvd.reducescatter(torch.from_numpy(rs.copy()), op=top),
                 f"reducescatter {op} {dtype}")
        compared += 10
    half = data((6,), "float32").astype("float16")
    same(hvd.allreduce(tf.constant(half), op=hvd.Sum),
         thvd.allreduce(torch.from_numpy(half.copy()), op=thvd.Sum), "allreduce float16")
    bf16 = tf.constant(data((6,), "float32"), tf.bfloat16)
    got = hvd.allreduce(bf16, op=hvd.Sum)
    want = thvd.allreduce(torch.from_numpy(tf.cast(bf16, tf.float32).numpy()).bfloat16(),
                          op=thvd.Sum)
    assert got.dtype == tf.bfloat16
    same(tf.cast(got, tf.float32), want.float(), "allreduce bfloat16")
    ps = hvd.add_process_set([0, 1])
    x = data((4,), "float32")
    same(hvd.allreduce(tf.constant(x), op=hvd.Sum, process_set=ps),
         thvd.allreduce(torch.from_numpy(x.copy()), op=thvd.Sum, process_set=ps),
         "allreduce on a process set")
    hvd.remove_process_set(ps)
    x = data((8,), "float32")
    same(hvd.allreduce(tf.constant(x), compression=hvd.Compression.fp16),
         thvd.allreduce(torch.from_numpy(x.copy()), compression=thvd.Compression.fp16),
         "allreduce fp16 compression")
    return compared + 4


@check
def objects() -> dict:
    return {"bcast": hvd.broadcast_object({"from": R, "list": [R, 2]}, root_rank=1),
            "gathered": hvd.allgather_object({"rank": R})}


@check
def broadcast_variables() -> list:
    v = tf.Variable(data((3,), "float32"))
    w = tf.Variable(data((2, 2), "float64"))
    hvd.broadcast_variables([v, w], root_rank=1)
    u = tf.Variable(data((4,), "float32"))

    @tf.function
    def in_graph() -> None:
        hvd.broadcast_variables([u], root_rank=0)

    in_graph()
    return [v.numpy().tolist(), w.numpy().tolist(), u.numpy().tolist()]


# -- gradients (Horovod's registered gradients) ---------------------------------------

@check
def gradients() -> dict:
    x = tf.Variable(np.arange(1, 7, dtype="float32").reshape(3, 2) * (R + 1))
    out: dict[str, Any] = {}

    def grads(fn: Callable[[tf.Tensor], tf.Tensor], graph: bool) -> np.ndarray:
        def body() -> tf.Tensor:
            with tf.GradientTape() as tape:
                y = fn(x)
                loss = tf.reduce_sum(y * tf.cast(tf.range(tf.shape(y)[0]), y.dtype)[:, None]
                                     if y.shape.rank == 2 else y)
            return tape.gradient(loss, x)

        return (tf.function(body)() if graph else body()).numpy()

    cases = {
        "allreduce_sum": lambda t: hvd.allreduce(t, op=hvd.Sum),
        "allreduce_avg": lambda t: hvd.allreduce(t),
        "allgather": lambda t: hvd.allgather(t),
        "broadcast": lambda t: hvd.broadcast(t, 0),
        "alltoall": lambda t: hvd.alltoall(t, splits=[1, 2] if R == 0 else [2, 1])[0],
        "reducescatter_sum": lambda t: hvd.reducescatter(tf.concat([t, t], 0), op=hvd.Sum),
        "reducescatter_avg": lambda t: hvd.reducescatter(tf.concat([t, t], 0)),
    }
    for name, fn in cases.items():
        eager, graph = grads(fn, False), grads(fn, True)
        assert np.allclose(eager, graph), f"{name}: eager {eager} != graph {graph}"
        out[name] = eager.tolist()
    return out


@check
def indexed_slices() -> dict:
    table = tf.Variable(np.arange(12, dtype="float32").reshape(6, 2))
    ids = tf.constant([R, 3, 3])

    def tape_grads(**kwargs: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(table, ids) ** 2)
        return hvd.DistributedGradientTape(tape, **kwargs).gradient(loss, [table])[0]

    sparse = tape_grads()
    dense = tape_grads(sparse_as_dense=True)
    assert isinstance(sparse, tf.IndexedSlices), type(sparse)
    assert isinstance(dense, tf.Tensor), type(dense)
    assert np.allclose(tf.convert_to_tensor(sparse).numpy(), dense.numpy())
    summed = hvd.allreduce(tf.IndexedSlices(tf.constant([[1.0, 2.0]]), tf.constant([R])),
                           op=hvd.Sum)
    return {"dense": dense.numpy().tolist(), "sum_indices": summed.indices.numpy().tolist()}


# -- misuse ---------------------------------------------------------------------------

def error_of(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the kind is the result
        return f"{type(exc).__name__}: {exc}"
    return "no error"


@check
def misuse_errors() -> dict:
    graph_allreduce = tf.function(lambda t: hvd.allreduce(t))
    return {
        "shape": error_of(lambda: hvd.allreduce(tf.ones([3 + R]))),
        "shape_graph": error_of(lambda: graph_allreduce(tf.ones([2, 2 + R]))),
        "dtype": error_of(lambda: hvd.allreduce(tf.ones([3], tf.float32 if R else tf.float64))),
        "root_mismatch": error_of(lambda: hvd.broadcast(tf.ones([2]), R)),
        "root_range": error_of(lambda: hvd.broadcast(tf.ones([2]), 7)),
        "variables_differ": error_of(lambda: hvd.broadcast_variables(
            [tf.Variable(tf.zeros([2 + R]))], 0)),
        "duplicate_set": error_of(lambda: (hvd.add_process_set([0, 1]),
                                           hvd.add_process_set([0, 1]))),
        "after": hvd.allreduce(tf.constant([1.0]), op=hvd.Sum).numpy().tolist(),
    }


# -- training ---------------------------------------------------------------------------

def _model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(3)])


def _dataset() -> tuple[np.ndarray, np.ndarray]:
    """The same 2*64 samples on every rank; rank r trains on its half."""
    g = np.random.default_rng(7)
    x = g.standard_normal((N * 64, 8)).astype("float32")
    y = (x[:, :3] * 2 + 0.1 * g.standard_normal((N * 64, 3))).astype("float32")
    return x, y


def _shard(a: np.ndarray, batch: int, rank: int) -> np.ndarray:
    """Rank `rank`'s samples: its `batch` rows of every global batch of N*batch rows."""
    steps = len(a) // (N * batch)
    return np.concatenate([a[(s * N + rank) * batch:(s * N + rank + 1) * batch]
                           for s in range(steps)])


@check
def gradient_tape_training() -> dict:
    x, y = _dataset()
    batch = 16
    out = {}
    for variant, kwargs in {"dense": {}, "predivide": {"gradient_predivide_factor": 2.0},
                            "topk_full": {"compression": hvd.Compression.topk(1.0)}}.items():
        model, reference = _model(3), _model(3)
        opt, ref_opt = keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1)
        xs, ys = _shard(x, batch, R), _shard(y, batch, R)

        @tf.function
        def step(xb: tf.Tensor, yb: tf.Tensor, model=model, opt=opt, kwargs=kwargs) -> None:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(xb) - yb) ** 2)
            tape = hvd.DistributedGradientTape(tape, **kwargs)
            opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                    model.trainable_variables))

        for s in range(len(xs) // batch):
            step(xs[s * batch:(s + 1) * batch], ys[s * batch:(s + 1) * batch])
            xb, yb = x[s * N * batch:(s + 1) * N * batch], y[s * N * batch:(s + 1) * N * batch]
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((reference(xb) - yb) ** 2)
            ref_opt.apply_gradients(zip(tape.gradient(loss, reference.trainable_variables),
                                        reference.trainable_variables))
        diff = max(float(np.max(np.abs(a - b)))
                   for a, b in zip(model.get_weights(), reference.get_weights()))
        assert diff < 1e-5, f"{variant}: {diff} from the one-process reference"
        out[variant] = [w.tolist() for w in model.get_weights()]
    # sparser top-k: no reference, but every rank must hold the same weights
    model, opt = _model(4), keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x[:16]) - y[:16]) ** 2)
    tape = hvd.DistributedGradientTape(tape, compression=hvd.Compression.topk(0.1))
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                            model.trainable_variables))
    out["topk_sparse"] = [w.tolist() for w in model.get_weights()]
    return out


@check
def keras_fit() -> dict:
    x, y = _dataset()
    batch, epochs, lr = 8, 2, 0.05
    model, reference = _model(5), _model(6)  # different starts: the callback broadcasts
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(lr, momentum=0.5)),
                  loss="mse")
    callbacks = [hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                 hvd.callbacks.MetricAverageCallback(),
                 hvd.callbacks.LearningRateWarmupCallback(lr, warmup_epochs=1)]
    history = model.fit(_shard(x, batch, R), _shard(y, batch, R), batch_size=batch,
                        epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    # one process, the doubled batch, the same schedule, rank 0's initial weights
    reference.set_weights(_model(5).get_weights())
    reference.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.5), loss="mse")
    reference.fit(x, y, batch_size=N * batch, epochs=epochs, shuffle=False, verbose=0,
                  callbacks=[hvd.callbacks.LearningRateWarmupCallback(lr, warmup_epochs=1)])
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(model.get_weights(), reference.get_weights()))
    assert diff < 1e-5, f"model.fit differs from the one-process reference by {diff}"
    return {"weights": [w.tolist() for w in model.get_weights()],
            "loss": history.history["loss"], "lr": history.history["lr"], "diff": diff}


@check
def keras_fit_backward_passes() -> dict:
    """backward_passes_per_step=2, averaged: one update per 2 local batches of every rank,
    as one process with batches 2 * N times larger."""
    x, y = _dataset()
    batch = 8
    model, reference = _model(9), _model(9)
    model.compile(optimizer=hvd.DistributedOptimizer(
        keras.optimizers.SGD(0.05, momentum=0.5), backward_passes_per_step=2,
        average_aggregated_gradients=True), loss="mse")
    model.fit(_shard(x, batch, R), _shard(y, batch, R), batch_size=batch, epochs=2,
              shuffle=False, verbose=0)
    reference.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.5), loss="mse")
    reference.fit(x, y, batch_size=2 * N * batch, epochs=2, shuffle=False, verbose=0)
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(model.get_weights(), reference.get_weights()))
    assert diff < 1e-5, f"backward_passes_per_step=2 differs from the reference by {diff}"
    return {"weights": [w.tolist() for w in model.get_weights()],
            "updates": int(model.optimizer.iterations.numpy())}


@check
def keras_fit_staleness() -> dict:
    x, y = _dataset()
    model = _model(8)
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.05), staleness=1),
                  loss="mse", run_eagerly=True)
    model.fit(_shard(x, 8, R), _shard(y, 8, R), batch_size=8, epochs=1, shuffle=False,
              verbose=0, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0)])
    model.optimizer.finish()
    return {"weights": [w.tolist() for w in model.get_weights()],
            "iterations": int(model.optimizer.iterations.numpy())}


out = os.environ["OUT"]
with open(os.path.join(out, f"rank{R}.json"), "w") as fh:
    json.dump(results, fh)
print(f"rank {R}: " + ", ".join(f"{k}={'ok' if v['ok'] else 'FAILED'}"
                                 for k, v in results.items()), file=sys.stderr)
