"""A small elastic job for the volunteer-client tests (run from its signed job folder).

Each process appends JSON lines to results/<node id>.jsonl in its working directory:
{"event": "step", "generation", "samples"} after every optimizer step, and
{"event": "done", "params": sha256} at the end, so a test can compare the ledger's credit
with what each node contributed and the final parameters of every member.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import torch
import torch.nn.functional as F

import elastic.torch as hvd
from elastic.torch import runtime

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--step-delay", type=float, default=0.05)
parser.add_argument("--burn", type=int, default=0, help="extra matmuls per step (CPU load)")
ARGS = parser.parse_args()
STEPS, STEP_DELAY = ARGS.steps, ARGS.step_delay
BATCH = 8


def params_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def record(event: str, **fields: object) -> None:
    ctx = runtime.context()
    os.makedirs("results", exist_ok=True)
    line = {"event": event, "node": ctx.node_id, "pid": os.getpid(), "time": time.time(),
            "generation": ctx.generation.id if ctx.generation else None, **fields}
    with open(os.path.join("results", f"{ctx.node_id}.jsonl"), "a") as handle:
        handle.write(json.dumps(line) + "\n")


def main() -> None:
    hvd.init()
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                         named_parameters=model.named_parameters())

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        while state.step < STEPS:
            g = torch.Generator().manual_seed(state.step * 1000 + hvd.rank())
            x = torch.randn(BATCH, 10, generator=g)
            y = (x.sum(dim=1) > 0).long()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step(samples=BATCH)
            hvd.record_loss(loss.item())
            load = torch.ones(128, 128)
            for _ in range(ARGS.burn):
                load = torch.tanh(load @ load / 128)
            record("step", step=state.step, samples=BATCH)
            state.step += 1
            time.sleep(STEP_DELAY)
            state.commit()

    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, step=0)
    train(state)
    record("done", params=params_hash(model))
    hvd.shutdown()


if __name__ == "__main__":
    main()
