"""A digits MLP trained under horderun, one rank of which may poison its gradient.

RUNS lists the runs of this job, one after another, each with a fresh optimizer (so
fresh rounds: its first step is the first round of a stream, as at a new generation):
`clean` or `attack`. ATTACK_RANK (-1: every rank) poisons its gradient in an `attack`
run as ATTACK says: `scale:F@STEP` multiplies it by F at STEP (`@STEP-`: and every later
step; F=-1 flips its sign), `nanloss@STEP` makes its
loss NaN at STEP, `nanloss@STEP-` at STEP and every later step. STALENESS, TOPK (a
density, 0: dense), MIN_SPARSE (top-k's min_sparse_numel, default 1024), STEPS,
DATA_SEED (which minibatches each rank draws; a list such as `100,200` trains each run
once per data order). EVAL_TAIL=N scores a run by the mean test
accuracy at N points over the last quarter of its steps instead of at its end only (SGD's
final iterate swings by several points from run to run). Writes $OUT/rank<r>.json: the
node id and per run the test accuracy (mean over data orders), a parameter hash, whether
the parameters are finite and the optimizer's stats (of the first data order), and per
data order (`orders`) the same.
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
MIN_SPARSE = int(os.environ.get("MIN_SPARSE", "1024"))  # top-k: smaller gradients go dense
STEPS = int(os.environ.get("STEPS", "200"))
ATTACK_RANK = int(os.environ.get("ATTACK_RANK", "1"))
KIND, _, WHEN = os.environ.get("ATTACK", "scale:1e6@0").partition("@")
FROM = int(WHEN.rstrip("-"))
ONWARD = WHEN.endswith("-")
DATA_SEEDS = [int(s) for s in os.environ.get("DATA_SEED", "100").split(",")]
EVAL_TAIL = int(os.environ.get("EVAL_TAIL", "1"))
BATCH = 32


def poisoned(step: int) -> bool:
    return (ATTACK_RANK in (-1, hvd.rank())) and (step == FROM or (ONWARD and step > FROM))


def accuracy_of(model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x_test).argmax(1) == y_test).float().mean()) * 100


def train(attack: bool, seed: int, x_train: torch.Tensor, y_train: torch.Tensor,
          x_test: torch.Tensor, y_test: torch.Tensor) -> dict:
    from digits_data import make_model

    torch.manual_seed(0)
    model = make_model()
    compression = (hvd.Compression.topk(TOPK, min_sparse_numel=MIN_SPARSE) if TOPK
                   else hvd.Compression.none)
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
        compression=compression, staleness=STALENESS)
    gen = torch.Generator().manual_seed(seed + hvd.rank())
    # Steps after which the model is scored: the last one, and with EVAL_TAIL > 1 evenly
    # spaced points over the last quarter.
    span = STEPS // 4
    scored = {STEPS - 1 - (i * span) // max(EVAL_TAIL - 1, 1) for i in range(EVAL_TAIL)}
    scores = []
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
        if step in scored and step != STEPS - 1:
            scores.append(accuracy_of(model, x_test, y_test))
    if STALENESS:
        optimizer.finish()
    scores.append(accuracy_of(model, x_test, y_test))
    accuracy = sum(scores) / len(scores)
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
    results = {}
    for run in RUNS:
        orders = [train(run == "attack", seed, *train_set.tensors, *test_set.tensors)
                  for seed in DATA_SEEDS]
        results[run] = {
            "accuracy": sum(o["accuracy"] for o in orders) / len(orders),
            "params": hashlib.sha256("".join(o["params"] for o in orders).encode()).hexdigest()
            if len(orders) > 1 else orders[0]["params"],
            "finite": all(o["finite"] for o in orders), "stats": orders[0]["stats"],
            "orders": orders}
    with open(os.path.join(os.environ["OUT"], f"rank{hvd.rank()}.json"), "w") as f:
        json.dump({"node": runtime.runtime().node_id, "runs": results}, f)


if __name__ == "__main__":
    main()
