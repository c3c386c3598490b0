"""CUDA collectives and top-k on the GPU of this worker's local rank (NCCL path)."""

from __future__ import annotations

import torch

import elastic.torch as hvd

hvd.init()
torch.cuda.set_device(hvd.local_rank())
device = torch.device("cuda", hvd.local_rank())
x = torch.full((1000,), float(hvd.rank() + 1), device=device)
summed = hvd.allreduce(x, op=hvd.Sum)
assert summed.is_cuda and summed.device == device
assert torch.allclose(summed, torch.full_like(x, sum(range(1, hvd.size() + 1))))
gathered = hvd.allgather(torch.ones(hvd.rank() + 1, 3, device=device))
assert gathered.is_cuda and gathered.shape[0] == sum(range(1, hvd.size() + 1))
topk = hvd.TopKAllreduce(hvd.Compression.topk(0.01))
out = topk(torch.randn(100_000, device=device), name="g")
assert out.is_cuda
print("cuda ok", hvd.rank(), flush=True)
