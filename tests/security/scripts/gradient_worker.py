"""A digits MLP trained under horderun, one rank of which may poison its gradient.

RUNS lists the runs of this job, one after another, each with a fresh optimizer (so
fresh rounds: its first step is the first round of a stream, as at a new generation):
`clean` or `attack`. ATTACK_RANK (-1: every rank) poisons its gradient in an `attack`
run as ATTACK says: `scale:F@STEP` multiplies it by F at STEP (`@STEP-`: and every later
step; F=-1 flips its sign), `nanloss@STEP` makes its
loss NaN at STEP, `nanloss@STEP-` at STEP and every later step. STALENESS, TOPK (a
density, 0: dense), STEPS, DATA_SEED (which minibatches each rank draws). Writes
$OUT/rank<r>.json: the node id and per run the test accuracy, a parameter hash, whether
the parameters are finite and the optimizer's stats.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
import elastic.torch as hvd  # noqa: E402
from elastic.torch import runtime  # noqa: E402

RUNS = os.environ.get("RUNS", "clean,attack").split(",")
STALENESS = int(os.environ.get("STALENESS", "1"))
TOPK = float(os.environ.get("TOPK", "0"))
STEPS = int(os.environ.get("STEPS", "200"))
ATTACK_RANK = int(os.environ.get("ATTACK_RANK", "1"))
KIND, _, WHEN = os.environ.get("ATTACK", "scale:1e6@0").partition("@")
FROM = int(WHEN.rstrip("-"))
ONWARD = WHEN.endswith("-")
DATA_SEED = int(os.environ.get("DATA_SEED", "100"))
BATCH = 32


def poisoned(step: int) -> bool:
    return (ATTACK_RANK in (-1, hvd.rank())) and (step == FROM or (ONWARD and step > FROM))


def train(attack: bool, x_train: torch.Tensor, y_train: torch.Tensor,
          x_test: torch.Tensor, y_test: torch.Tensor) -> dict:
    from digits_data import make_model

    torch.manual_seed(0)
    model = make_model()
    compression = hvd.Compression.topk(TOPK) if TOPK else hvd.Compression.none
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
        compression=compression, staleness=STALENESS)
    gen = torch.Generator().manual_seed(DATA_SEED + hvd.rank())
    for step in range(STEPS):
        i = torch.randint(0, len(y_train), (BATCH,), generator=gen)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x_train[i]), y_train[i])
        if attack and KIND == "nanloss" and poisoned(step):
            loss = loss * float("nan")
        loss.backward()
        if attack and KIND.startswith("scale:") and poisoned(step):
            with torch.no_grad():
                for p in model.parameters():
                    p.grad.mul_(float(KIND.split(":")[1]))
        optimizer.step(samples=BATCH)
    if STALENESS:
        optimizer.finish()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean()) * 100
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    return {"accuracy": accuracy, "params": digest.hexdigest(),
            "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
            "stats": optimizer.communication_stats()}


def main() -> None:
    from digits_data import digits_datasets

    torch.set_num_threads(1)
    hvd.init()
    train_set, test_set = digits_datasets()
    results = {run: train(run == "attack", *train_set.tensors, *test_set.tensors)
               for run in RUNS}
    with open(os.path.join(os.environ["OUT"], f"rank{hvd.rank()}.json"), "w") as f:
        json.dump({"node": runtime.runtime().node_id, "runs": results}, f)


if __name__ == "__main__":
    main()
