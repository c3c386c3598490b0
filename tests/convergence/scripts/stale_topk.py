"""Top-k 1% with staleness against synchronous top-k, several configurations in one job.

TASK (teacher | digits | cnn) picks the model and data; CONFIGS lists `S:momentum`
pairs (S=0 is synchronous top-k, the reference), run one after another in these
processes, each from the same initial parameters and data streams, for STEPS steps of
a batch of 32 per worker (each followed by a random sleep of up to SLEEP seconds, a
loaded machine's jitter; default none), the learning rate decayed to 0 along a cosine
(SCHEDULE=cosine, the default; `constant` keeps it), so that the end compares where
training settled rather than the noise of its last steps; then ended with
`optimizer.finish()`. Writes
$OUT/rank<r>.json: per configuration the test accuracy, a parameter hash and the
round statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
import elastic.torch as hvd  # noqa: E402

TASK = os.environ.get("TASK", "teacher")
CONFIGS = [tuple(c.split(":")) for c in os.environ.get("CONFIGS", "0:0.9,1:0.9").split(",")]
STEPS = int(os.environ.get("STEPS", "400"))
SLEEP = float(os.environ.get("SLEEP", "0"))
SCHEDULE = os.environ.get("SCHEDULE", "cosine")
# Runs per configuration with different data orders; the accuracy reported is their mean
# (digits has 360 test images: one run's accuracy moves by about half a point run to run).
SEEDS = int(os.environ.get("SEEDS", "1"))
BATCH = 32

Batches = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def teacher_task() -> tuple[Callable[[], torch.nn.Module], Batches, tuple, float]:
    """Issue 9's task: 64 inputs, labels from a random linear teacher (samples within a
    margin of 1 of a tie left out), MLP 64-256-10, SGD lr 0.1."""
    g = torch.Generator().manual_seed(1234)
    teacher = torch.randn(64, 10, generator=g)

    def sample(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        xs, got = [], 0
        while got < n:
            x = torch.randn(4 * n, 64, generator=gen)
            top = (x @ teacher).topk(2, 1).values
            x = x[top[:, 0] - top[:, 1] > 1.0]
            xs.append(x)
            got += len(x)
        x = torch.cat(xs)[:n]
        return x, (x @ teacher).argmax(1)

    def model() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                   torch.nn.Linear(256, 10))

    return model, lambda gen: sample(BATCH, gen), sample(2000, g), 0.1


def digits_task(cnn: bool) -> tuple[Callable[[], torch.nn.Module], Batches, tuple, float]:
    """scikit-learn's digits: the examples' MLP 64-128-64-10, or a small CNN on the 8x8
    images (conv 16, pool, conv 32, linear), SGD lr 0.1 (MLP) or 0.05 (CNN)."""
    from digits_data import digits_datasets, make_model

    train, test = digits_datasets()
    x_train, y_train = train.tensors
    shape = (-1, 1, 8, 8) if cnn else (-1, 64)

    def batches(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.randint(0, len(y_train), (BATCH,), generator=gen)
        return x_train[i].reshape(shape), y_train[i]

    def cnn_model() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
            torch.nn.Linear(32 * 4 * 4, 10))

    x_test, y_test = test.tensors
    return (cnn_model if cnn else make_model), batches, (x_test.reshape(shape), y_test), \
        0.05 if cnn else 0.1


def decay(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule SCHEDULE names, stepped once per training step."""
    if SCHEDULE == "constant":
        return None
    if SCHEDULE != "cosine":
        raise ValueError(f"SCHEDULE={SCHEDULE!r}: use cosine or constant")
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def train(make: Callable[[], torch.nn.Module], batches: Batches, test: tuple, lr: float,
          staleness: int, momentum: float, seed: int) -> dict:
    """One run of a configuration; `seed` picks the data order (the model starts the same)."""
    x_test, y_test = test
    torch.manual_seed(0)
    model = make()
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
        named_parameters=model.named_parameters(),
        compression=hvd.Compression.topk(0.01), staleness=staleness)
    schedule = decay(optimizer)
    gen = torch.Generator().manual_seed(100 + 1000 * seed + hvd.rank())
    jitter = random.Random(7 + 1000 * seed + hvd.rank())
    for _ in range(STEPS):
        x, y = batches(gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if SLEEP:
            time.sleep(jitter.random() * SLEEP)
        optimizer.step(samples=len(y))
        if schedule is not None:
            schedule.step()
    optimizer.finish()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean()) * 100
    return {"accuracy": accuracy, "params": digest(model),
            "stats": optimizer.communication_stats()}


def main() -> None:
    torch.set_num_threads(1)
    hvd.init()
    make, batches, (x_test, y_test), lr = (teacher_task() if TASK == "teacher"
                                           else digits_task(TASK == "cnn"))
    results = []
    for staleness, momentum in CONFIGS:
        runs = [train(make, batches, (x_test, y_test), lr, int(staleness), float(momentum),
                      seed) for seed in range(SEEDS)]
        results.append({"staleness": int(staleness), "momentum": float(momentum),
                        "accuracy": sum(r["accuracy"] for r in runs) / len(runs),
                        "accuracies": [r["accuracy"] for r in runs],
                        "params": [r["params"] for r in runs],
                        "stats": runs[-1]["stats"]})
    with open(os.path.join(os.environ["OUT"], f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
