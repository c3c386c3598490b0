"""Runs StalenessRounds for a fixed number of steps; rank SLOW_RANK sleeps longer per step.

Writes $OUT/rank<r>.json: per-round parameter hashes, contributions and stats.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import torch

import elastic.torch as hvd
from elastic.rounds import StalenessRounds

STALENESS = int(os.environ.get("STALENESS", "2"))
STEPS = int(os.environ.get("STEPS", "40"))
FAST = float(os.environ.get("FAST_STEP", "0.02"))
SLOW = float(os.environ.get("SLOW_STEP", "0.05"))
SLOW_RANK = int(os.environ.get("SLOW_RANK", "-1"))

# Rank MALFORM_RANK sends garbage instead of its 5th message (a JSON list as header).
MALFORM_RANK = int(os.environ.get("MALFORM_RANK", "-1"))

hvd.init()
rank = hvd.rank()
if rank == MALFORM_RANK:
    import elastic.rounds as rounds_module

    real_pack, sent = rounds_module.pack, [0]

    def garbage_once(header: dict, payload: torch.Tensor) -> torch.Tensor:
        sent[0] += 1
        if sent[0] != 5:
            return real_pack(header, payload)
        raw = b"[1, 2]"
        return torch.tensor(list(struct.pack("<I", len(raw)) + raw + b"\0\0"),
                            dtype=torch.uint8)

    rounds_module.pack = garbage_once
rounds = StalenessRounds(500, staleness=STALENESS)
param = torch.zeros(500)
applied = 0
log = []


def apply(results: list) -> None:
    global applied
    for result in results:
        if result.aggregate is not None:
            param.sub_(0.1 * result.aggregate)
            applied += 1
        log.append({"round": result.round, "version": result.version,
                    "hash": hashlib.sha256(param.numpy().tobytes()).hexdigest()[:16],
                    "contributions": [[c.rank, c.staleness, c.accepted] for c in
                                      result.contributions]})


generator = torch.Generator().manual_seed(rank)
started = time.monotonic()
for _ in range(STEPS):
    grad = torch.randn(500, generator=generator) + param
    time.sleep(SLOW if rank == SLOW_RANK else FAST)
    rounds.submit(grad, samples=8, version=applied)
    apply(rounds.results(block=False))
    while rounds.outstanding > STALENESS:
        apply(rounds.results(block=True, timeout=30))
elapsed = time.monotonic() - started
# End together: every rank sees the same rounds, up to the same last one.
apply(rounds.finish())
with open(os.path.join(os.environ["OUT"], f"rank{rank}.json"), "w") as f:
    json.dump({"elapsed": elapsed, "log": log, "stats": rounds.stats.as_dict()}, f)
