"""Training with staleness ended the Horovod way: `optimizer.synchronize()`,
`state.commit()` or `hvd.shutdown()` (END), never `optimizer.finish()`.

Rank 1 is slower, so when the loop ends the members have applied different numbers of
aggregates and rounds are in flight. Mid-way (step MID) the same call is made once and
training goes on, so the rounds must start again after it. Writes $OUT/rank<r>.json with
the parameter hash after the end call, and after the mid-way call.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch
import torch.nn.functional as F

import elastic.torch as hvd

END = os.environ["END"]  # synchronize | commit | shutdown
STEPS = int(os.environ.get("STEPS", "40"))
MID = int(os.environ.get("MID", "20"))


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


hvd.init()
rank = hvd.rank()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                     compression=hvd.Compression.topk(0.05, min_sparse_numel=256),
                                     staleness=2)
state = hvd.elastic.TorchState(model, optimizer) if END == "commit" else None
generator = torch.Generator().manual_seed(100 + rank)
mid = ""


def end_call() -> None:
    if END == "synchronize":
        optimizer.synchronize()
    elif END == "commit":
        state.commit()
    else:
        hvd.shutdown()


for step in range(STEPS):
    x = torch.randn(16, 32, generator=generator)
    y = torch.randint(0, 4, (16,), generator=generator)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if step == MID and END != "shutdown":
        # Horovod's clipping pattern: synchronize, clip, step without synchronizing.
        grads = [p.grad.clone() for p in model.parameters()]
        end_call()
        mid = digest(model)
        kept = all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        with optimizer.skip_synchronize():
            optimizer.step(samples=16)
        if not kept:
            raise SystemExit("the mid-way call changed this step's gradients")
        continue
    time.sleep(0.004 if rank == 0 else 0.02)
    optimizer.step(samples=16)
end_call()
stats = optimizer.communication_stats()
with open(os.path.join(os.environ["OUT"], f"rank{rank}.json"), "w") as f:
    json.dump({"params": digest(model), "mid": mid, "stats": stats}, f)
