"""DistributedOptimizer with staleness (and optional top-k); one rank is slowed on purpose.

Writes $OUT/rank<r>.json with the final parameter hash, step count, elapsed time and the
optimizer's communication stats.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import elastic.torch as hvd

STALENESS = int(os.environ.get("STALENESS", "2"))
STEPS = int(os.environ.get("STEPS", "40"))
DELAY = float(os.environ.get("STEP_DELAY", "0.01"))
SLOW_RANK = int(os.environ.get("SLOW_RANK", "-1"))
SLOW_FACTOR = float(os.environ.get("SLOW_FACTOR", "3"))
TOPK = os.environ.get("TOPK", "0")  # a density, or "fp16" for Compression.fp16
# Rank POISON_RANK corrupts its gradient at the steps of POISON (step:factor; nan fills).
POISON_RANK = int(os.environ.get("POISON_RANK", "-1"))
POISON = {int(k): float(v) for k, v in (item.split(":") for item in
          os.environ.get("POISON", "10:nan,20:1e4").split(","))}
NORM_FACTOR = float(os.environ.get("NORM_FACTOR", "0"))  # 0: the default NormCheck

hvd.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
if TOPK == "fp16":
    compression = hvd.Compression.fp16
elif float(TOPK):
    compression = hvd.Compression.topk(float(TOPK), min_sparse_numel=256)
else:
    compression = hvd.Compression.none
norm_check = hvd.NormCheck(factor=NORM_FACTOR) if NORM_FACTOR else None
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                     compression=compression, staleness=STALENESS,
                                     norm_check=norm_check)
generator = torch.Generator().manual_seed(100 + hvd.rank())
started = time.monotonic()
for step in range(STEPS):
    x = torch.randn(16, 32, generator=generator)
    y = torch.randint(0, 4, (16,), generator=generator)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if hvd.rank() == POISON_RANK and step in POISON:
        factor = POISON[step]
        with torch.no_grad():
            for p in model.parameters():
                if math.isnan(factor):
                    p.grad.fill_(factor)
                else:
                    p.grad.mul_(factor)
    time.sleep(DELAY * (SLOW_FACTOR if hvd.rank() == SLOW_RANK else 1.0))
    optimizer.step(samples=16)
elapsed = time.monotonic() - started
optimizer.finish()
digest = hashlib.sha256()
for p in model.parameters():
    digest.update(p.detach().numpy().tobytes())
with open(os.path.join(os.environ["OUT"], f"rank{hvd.rank()}.json"), "w") as f:
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    json.dump({"params": digest.hexdigest(), "elapsed": elapsed, "finite": finite,
               "stats": optimizer.communication_stats()}, f)
