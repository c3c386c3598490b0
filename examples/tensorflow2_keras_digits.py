"""Horovod-style Keras training (TensorFlow 2, Keras 3) on scikit-learn's digits.

Written as a Horovod `tensorflow2_keras_mnist.py` script; only the import differs:

    horderun -np 2 python examples/tensorflow2_keras_digits.py

Reaches about 97% test accuracy in 15 epochs (needs `pip install -e ".[tensorflow,examples]"`).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import elastic.tensorflow.keras as hvd  # was: import horovod.tensorflow.keras as hvd  # noqa: E402,I001


def digits() -> tuple[np.ndarray, ...]:
    """Train/test split (80/20) of the bundled 8x8 digits, pixels scaled to [0, 1]."""
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (images / 16.0).astype("float32"), labels, test_size=0.2, random_state=0,
        stratify=labels)
    return x_train, x_test, y_train, y_test


def make_model() -> keras.Model:
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.001, help="per worker (scaled by size)")
    parser.add_argument("--topk", type=float, default=0.0,
                        help="Horde: send only this fraction of gradient entries")
    args = parser.parse_args()

    hvd.init()
    keras.utils.set_random_seed(42 + hvd.rank())  # different starts: the callback syncs them
    x_train, x_test, y_train, y_test = digits()
    # Each worker trains on its own shard of the training set.
    x_shard, y_shard = x_train[hvd.rank()::hvd.size()], y_train[hvd.rank()::hvd.size()]

    model = make_model()
    scaled_lr = args.lr * hvd.size()
    compression = hvd.Compression.topk(args.topk) if args.topk else hvd.Compression.none
    opt = hvd.DistributedOptimizer(keras.optimizers.Adam(scaled_lr), compression=compression)
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    callbacks = [
        # Horde: each batch's loss goes to the status page's loss chart.
        keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: hvd.record_loss(float(logs["loss"]))),
        # Start every worker from rank 0's weights.
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        # Average the metrics over the workers at the end of every epoch.
        hvd.callbacks.MetricAverageCallback(),
        # Ramp the learning rate up from lr to lr * size over the first epochs.
        hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=3,
                                                 verbose=1),
    ]
    model.fit(x_shard, y_shard, batch_size=args.batch_size, epochs=args.epochs,
              callbacks=callbacks, verbose=2 if hvd.rank() == 0 else 0)

    # Each worker evaluates its share of the test set; the accuracies are averaged.
    loss, accuracy = model.evaluate(x_test[hvd.rank()::hvd.size()],
                                    y_test[hvd.rank()::hvd.size()], verbose=0)
    accuracy = float(hvd.allreduce(np.float32(accuracy), name="accuracy"))
    if hvd.rank() == 0:
        print(f"final test accuracy: {accuracy:.2%} on {hvd.size()} workers", flush=True)


if __name__ == "__main__":
    main()
