"""hvd.TopKAllreduce keeps the mass: sent (averaged) + averaged residual == dense average."""

from __future__ import annotations

import torch

import elastic.torch as hvd

hvd.init()
topk = hvd.TopKAllreduce(hvd.Compression.topk(0.1, min_sparse_numel=10))
torch.manual_seed(hvd.rank())
dense_total = torch.zeros(100, dtype=torch.float64)
sent_total = torch.zeros(100, dtype=torch.float64)
for _ in range(50):
    g = torch.randn(100)
    dense_total += hvd.allreduce(g).double()
    sent_total += topk(g, name="g").double()
residual = hvd.allreduce(topk.compressor.residual("g")).double()
error = (dense_total - sent_total - residual).abs().max().item()
print(f"mass error {error:.3g} bytes {topk.stats.bytes_sent}", flush=True)
assert error < 1e-4, error

# Warm-up steps above the allgather's break-even (1/size for fp32 pairs) go dense: one ring
# allreduce (2 (N-1)/N * d * 4 bytes), never more than Horovod's own, and the mass is kept.
warm = hvd.TopKAllreduce(hvd.Compression.topk(0.05, warmup_steps=6, min_sparse_numel=10))
dense_total.zero_()
sent_total.zero_()
per_step = []
for _ in range(12):
    g = torch.randn(100)
    before = warm.stats.bytes_sent
    dense_total += hvd.allreduce(g).double()
    sent_total += warm(g, name="w").double()
    per_step.append(warm.stats.bytes_sent - before)
ring = int(2 * (hvd.size() - 1) / hvd.size() * 100 * 4)
assert per_step[0] == ring, (per_step, ring)
assert per_step[-1] < ring, per_step
residual = hvd.allreduce(warm.compressor.residual("w")).double()
error = (dense_total - sent_total - residual).abs().max().item()
print(f"warm-up mass error {error:.3g} steps {per_step}", flush=True)
assert error < 1e-4, error
