"""Trains synchronously and logs, per step, the samples this worker contributed.

$OUT/<node id>.log gets one line per step: "<generation> <step> <samples>".
REINIT_EVERY=k: `hvd.barrier(); hvd.shutdown(); hvd.init()` after every k steps.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

import elastic.torch as hvd
from elastic.torch import runtime

STEPS = int(os.environ.get("STEPS", "60"))
DELAY = float(os.environ.get("STEP_DELAY", "0.05"))
# "0": a plain Horovod step() (no sample count): every member is credited 1 per step.
PASS_SAMPLES = os.environ.get("PASS_SAMPLES", "1") == "1"
REINIT_EVERY = int(os.environ.get("REINIT_EVERY", "0"))

hvd.init()
ctx = runtime.context()
torch.manual_seed(0)
model = torch.nn.Linear(8, 2)
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                     named_parameters=model.named_parameters())
batch = 4 + hvd.rank()
credited = batch if PASS_SAMPLES else 1
with open(os.path.join(os.environ["OUT"], f"{ctx.node_id}.log"), "w") as log:
    for step in range(STEPS):
        x = torch.randn(batch, 8)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long))
        loss.backward()
        if PASS_SAMPLES:
            optimizer.step(samples=batch)
        else:
            optimizer.step()
        hvd.record_loss(loss.item())
        log.write(f"{runtime.context().generation.id} {step} {credited}\n")
        log.flush()
        time.sleep(DELAY)
        if REINIT_EVERY and (step + 1) % REINIT_EVERY == 0:
            hvd.barrier()
            hvd.shutdown()
            hvd.init()
hvd.shutdown()
