"""Elastic Keras training on scikit-learn's digits, written as Horovod's elastic Keras example.

Workers may come and go while it trains:

    horderun -np 2 --min-np 1 --max-np 3 python examples/tensorflow2_keras_digits_elastic.py
    horderun --join --job <job> -np 1 python examples/tensorflow2_keras_digits_elastic.py

A membership change rolls back to the last commit (a lost worker) or keeps the state (a
newcomer, who receives it from rank 0), then `fit` goes on for the epochs that remain.
Reaches about 97% test accuracy in 15 epochs.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from tensorflow2_keras_digits import digits, make_model  # noqa: E402

import elastic.tensorflow.keras as hvd  # was: import horovod.tensorflow.keras as hvd  # noqa: E402,I001


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.001, help="per worker")
    parser.add_argument("--batches-per-commit", type=int, default=10)
    args = parser.parse_args()

    hvd.init()
    keras.utils.set_random_seed(42)
    x_train, x_test, y_train, y_test = digits()
    model = make_model()
    model.compile(optimizer=hvd.DistributedOptimizer(keras.optimizers.Adam(args.lr)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    state = hvd.elastic.KerasState(model, batch=0, epoch=0)

    def on_state_reset() -> None:
        # The learning rate follows the number of workers, as in Horovod's example.
        model.optimizer.learning_rate = args.lr * hvd.size()

    state.register_reset_callbacks([on_state_reset])
    on_state_reset()
    callbacks = [
        # Horde: each batch's loss goes to the status page's loss chart.
        keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: hvd.record_loss(float(logs["loss"]))),
        hvd.callbacks.MetricAverageCallback(),
        hvd.elastic.UpdateBatchStateCallback(state),
        hvd.elastic.UpdateEpochStateCallback(state),
        hvd.elastic.CommitStateCallback(state, batches_per_commit=args.batches_per_commit),
    ]

    @hvd.elastic.run
    def train(state: hvd.elastic.KerasState) -> None:
        rank, size = hvd.rank(), hvd.size()
        state.model.fit(x_train[rank::size], y_train[rank::size], batch_size=args.batch_size,
                        epochs=args.epochs - state.epoch, callbacks=callbacks,
                        verbose=2 if rank == 0 else 0)

    train(state)
    _, accuracy = model.evaluate(x_test[hvd.rank()::hvd.size()],
                                 y_test[hvd.rank()::hvd.size()], verbose=0)
    accuracy = float(hvd.allreduce(np.float32(accuracy), name="accuracy"))
    if hvd.rank() == 0:
        print(f"final test accuracy: {accuracy:.2%} on {hvd.size()} workers", flush=True)


if __name__ == "__main__":
    main()
