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
