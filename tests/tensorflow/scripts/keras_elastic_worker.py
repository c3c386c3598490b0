"""Elastic Keras worker: `model.fit` under `hvd.elastic.run` with KerasState and the elastic
callbacks; records every commit as tests/elastic's workers do.

Each process appends JSON lines to $HORDE_TEST_OUT/<node id>.jsonl:
{"event": "commit"|"start"|"done", "pid", "node", "generation", "rank", "size", "epoch", "batch",
 "params": sha256 of the weights}.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import elastic.tensorflow.keras as hvd  # noqa: E402
from elastic.core import session as runtime  # noqa: E402 - the test reads the generation id

OUT = os.environ["HORDE_TEST_OUT"]
EPOCHS = int(os.environ.get("TEST_EPOCHS", "3"))
STEP_DELAY = float(os.environ.get("TEST_STEP_DELAY", "0.05"))
BATCH = 8


def params_hash(model: keras.Model) -> str:
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:16]


def record(event: str, state: object, model: keras.Model) -> None:
    ctx = runtime.context()
    line = {"event": event, "pid": os.getpid(), "node": ctx.node_id, "time": time.time(),
            "generation": ctx.generation.id, "rank": hvd.rank(), "size": hvd.size(),
            "epoch": state.epoch, "batch": state.batch, "params": params_hash(model)}
    with open(os.path.join(OUT, f"{ctx.node_id}.jsonl"), "a") as handle:
        handle.write(json.dumps(line) + "\n")


class Record(keras.callbacks.Callback):
    """After CommitStateCallback: note the commit, then pace the steps."""

    def __init__(self, state: object) -> None:
        super().__init__()
        self.state = state

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        record("commit", self.state, self.model)
        time.sleep(STEP_DELAY)


def main() -> None:
    hvd.init()
    g = np.random.default_rng(0)
    x = g.standard_normal((256, 10)).astype("float32")
    y = (x.sum(axis=1) > 0).astype("int64")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="tanh"),
                              keras.layers.Dense(2)])
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.SGD(0.1, momentum=0.9)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    state = hvd.elastic.KerasState(model, batch=0, epoch=0)
    callbacks = [hvd.elastic.UpdateBatchStateCallback(state),
                 hvd.elastic.UpdateEpochStateCallback(state),
                 hvd.elastic.CommitStateCallback(state),
                 Record(state)]

    @hvd.elastic.run
    def train(state: hvd.elastic.KerasState) -> None:
        record("start", state, state.model)
        r, n = hvd.rank(), hvd.size()
        state.model.fit(x[r::n], y[r::n], batch_size=BATCH, epochs=EPOCHS - state.epoch,
                        shuffle=False, verbose=0, callbacks=callbacks)

    train(state)
    record("done", state, model)


if __name__ == "__main__":
    main()
