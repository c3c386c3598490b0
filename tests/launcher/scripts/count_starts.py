"""Notes its start in $STARTS_DIR, allreduces once, then rank r sleeps $SLEEP_RANK_<r> s."""

from __future__ import annotations

import os
import time

import torch

import elastic.torch as hvd

with open(os.path.join(os.environ["STARTS_DIR"], f"{os.getpid()}.start"), "w") as f:
    f.write(os.environ.get("HORDE_NODE_ID", ""))
hvd.init()
hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum)
time.sleep(float(os.environ.get(f"SLEEP_RANK_{hvd.rank()}", "0")))
