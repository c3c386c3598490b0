"""Trains a fixed model on fixed global batches; saves the final parameters.

Under `horderun -np N` each rank takes its slice of every global batch of N*B samples;
run alone (size 1) with BATCH=N*B it takes whole global batches. Averaged gradients
make both compute the same updates, so the final parameters must agree.
"""

from __future__ import annotations

import hashlib
import os
import sys

import torch
import torch.nn.functional as F

import elastic.torch as hvd

GLOBAL_BATCH = int(os.environ.get("GLOBAL_BATCH", "32"))
STEPS = int(os.environ.get("STEPS", "20"))


def main(out: str) -> None:
    hvd.init()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(GLOBAL_BATCH * STEPS, 20, generator=generator)
    y = torch.randint(0, 4, (GLOBAL_BATCH * STEPS,), generator=generator)
    torch.manual_seed(7 + hvd.rank())  # ranks start different: broadcast must fix it
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    local = GLOBAL_BATCH // hvd.size()
    digests = []
    for step in range(STEPS):
        start = step * GLOBAL_BATCH + hvd.rank() * local
        xb, yb = x[start:start + local], y[start:start + local]
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
        digest = hashlib.sha256()
        for p in model.parameters():
            digest.update(p.detach().numpy().tobytes())
        digests.append(digest.hexdigest())
    torch.save({"params": model.state_dict(), "digests": digests},
               f"{out}.rank{hvd.rank()}.pt")
    hvd.shutdown()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/equivalence")
