"""Elastic training worker for the elasticity tests: records every commit it makes.

Each process appends JSON lines to $HORDE_TEST_OUT/<node id>.jsonl:
{"event": "commit", "pid", "generation", "rank", "size", "epoch", "batch", "params": sha256}
so a test can check that survivors were never restarted, that members held identical
parameters at each commit, and which generations a node belonged to.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import elastic.torch as hvd
from elastic.torch import runtime

OUT = os.environ["HORDE_TEST_OUT"]
EPOCHS = int(os.environ.get("TEST_EPOCHS", "3"))
STEP_DELAY = float(os.environ.get("TEST_STEP_DELAY", "0.05"))
COMMIT_EVERY = int(os.environ.get("TEST_COMMIT_EVERY", "2"))
STALENESS = int(os.environ.get("TEST_STALENESS", "0"))
TOPK = float(os.environ.get("TEST_TOPK", "0"))  # a density; 0: dense
STOP_FILE = os.environ.get("TEST_STOP_FILE", "")  # end at the next epoch once it exists
BATCH = 8


def params_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def record(event: str, **fields: object) -> None:
    ctx = runtime.context()
    line = {"event": event, "pid": os.getpid(), "node": ctx.node_id, "time": time.time(),
            "generation": ctx.generation.id, "rank": hvd.rank(), "size": hvd.size(), **fields}
    with open(os.path.join(OUT, f"{ctx.node_id}.jsonl"), "a") as handle:
        handle.write(json.dumps(line) + "\n")


def main() -> None:
    hvd.init()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=generator)
    y = (x.sum(dim=1) > 0).long()
    dataset = TensorDataset(x, y)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    compression = (hvd.Compression.topk(TOPK, min_sparse_numel=64) if TOPK
                   else hvd.Compression.none)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression, staleness=STALENESS)
    sampler = hvd.elastic.ElasticSampler(dataset, shuffle=True, seed=3)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        record("start", epoch=state.epoch, batch=state.batch, params=params_hash(model))
        for state.epoch in range(state.epoch, EPOCHS):  # noqa: B020 - Horovod idiom
            for xb, yb in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                optimizer.step(samples=len(yb)) if STALENESS else optimizer.step()
                sampler.record_batch(state.batch, BATCH)
                state.batch += 1
                time.sleep(STEP_DELAY)
                if state.batch % COMMIT_EVERY == 0:
                    commit(state, epoch=state.epoch, batch=state.batch)
            state.batch = 0
            sampler.set_epoch(state.epoch + 1)
            commit(state, epoch=state.epoch + 1, batch=0)
            # The test says when to end (every rank decides alike: rank 0's answer).
            if STOP_FILE and hvd.broadcast_object(os.path.exists(STOP_FILE), root_rank=0):
                break

    def commit(state: hvd.elastic.TorchState, **fields: object) -> None:
        """`state.commit()` (save, then check for new members), recorded between the two:
        a reset raised by the check restores exactly the state recorded here."""
        state.save()
        record("commit", params=params_hash(model), stats=optimizer.communication_stats(),
               **fields)
        state.check_host_updates()

    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, sampler=sampler, epoch=0,
                                   batch=0)
    train(state)
    optimizer.finish()  # staleness: end the rounds together (nothing to do otherwise)
    record("done", params=params_hash(model), stats=optimizer.communication_stats())


if __name__ == "__main__":
    main()
