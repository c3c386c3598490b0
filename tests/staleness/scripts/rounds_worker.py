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
# CHECK=1: gradient i of rank r is the constant r * 1000 + i, submitted with i + 1
# samples, so every member can check each aggregate against the contributions the round
# lists; rounds are slowed so that members have several gradients pending. PARTS=1: the
# codec encodes each gradient at submit (messages in parts), else it combines them.
PARTS = os.environ.get("PARTS") == "1"
CHECK = os.environ.get("CHECK") == "1"

hvd.init()
rank = hvd.rank()
if rank == MALFORM_RANK:
    import elastic.staleness.rounds as rounds_module

    real_pack, sent = rounds_module.pack, [0]

    def garbage_once(header: dict, payload: torch.Tensor) -> torch.Tensor:
        sent[0] += 1
        if sent[0] != 5:
            return real_pack(header, payload)
        raw = b"[1, 2]"
        return torch.tensor(list(struct.pack("<I", len(raw)) + raw + b"\0\0"),
                            dtype=torch.uint8)

    rounds_module.pack = garbage_once
codec = None
if CHECK:
    from elastic.rounds import DenseCodec

    class SlowCodec(DenseCodec):
        encodes_each = PARTS

        def norm(self, data: torch.Tensor, numel: int) -> float:
            time.sleep(0.005)
            return super().norm(data, numel)

    codec = SlowCodec()
rounds = StalenessRounds(500, staleness=STALENESS, codec=codec)
param = torch.zeros(500)
applied = 0
log = []
checks = {"aggregates": 0, "wrong": 0, "most_parts": 0, "no_payload": 0}


def check(result) -> None:
    """The aggregate is the weighted average of the accepted contributions' gradients."""
    accepted = [c for c in result.contributions if c.accepted]
    checks["no_payload"] += sum(c.reason == "no payload" for c in result.contributions)
    per_rank: dict[int, int] = {}
    for c in result.contributions:
        per_rank[c.rank] = per_rank.get(c.rank, 0) + 1
    checks["most_parts"] = max([checks["most_parts"], *per_rank.values()])
    if result.aggregate is None:
        return
    mass = sum(c.weight * c.samples for c in accepted)
    expected = sum(c.weight * c.samples * (c.rank * 1000 + c.samples - 1)
                   for c in accepted) / mass
    checks["aggregates"] += 1
    if not torch.allclose(result.aggregate, torch.full((500,), expected), rtol=1e-5):
        checks["wrong"] += 1


def apply(results: list) -> None:
    global applied
    for result in results:
        if CHECK:
            check(result)
        if result.aggregate is not None:
            param.sub_(0.1 * result.aggregate)
            applied += 1
            if CHECK:  # later aggregates reuse this memory: the checks cover recycling
                rounds.recycle(result.aggregate)
        log.append({"round": result.round, "version": result.version,
                    "hash": hashlib.sha256(param.numpy().tobytes()).hexdigest()[:16],
                    "contributions": [[c.rank, c.staleness, c.accepted] for c in
                                      result.contributions]})


generator = torch.Generator().manual_seed(rank)
started = time.monotonic()
for i in range(STEPS):
    grad = torch.randn(500, generator=generator) + param
    if CHECK:
        grad = torch.full((500,), float(rank * 1000 + i))
    time.sleep(SLOW if rank == SLOW_RANK else FAST)
    rounds.submit(grad, samples=i + 1 if CHECK else 8, version=applied)
    apply(rounds.results(block=False))
    while rounds.outstanding > STALENESS:
        apply(rounds.results(block=True, timeout=30))
elapsed = time.monotonic() - started
# End together: every rank sees the same rounds, up to the same last one.
apply(rounds.finish())
with open(os.path.join(os.environ["OUT"], f"rank{rank}.json"), "w") as f:
    json.dump({"elapsed": elapsed, "log": log, "stats": rounds.stats.as_dict(),
               "checks": checks}, f)
