"""Horovod's basic queries: ranks, sizes and what this build supports."""

from __future__ import annotations

import torch
import torch.distributed as dist

from elastic.core.capabilities import (  # noqa: F401 - Horovod's names, re-exported
    ccl_built,
    ddl_built,
    gloo_built,
    gloo_enabled,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    rocm_built,
    start_timeline,
    stop_timeline,
    sycl_built,
)
from elastic.torch.runtime import runtime


def size() -> int:
    """Number of workers in the current generation."""
    return runtime().topology.size


def rank() -> int:
    """This worker's rank in the current generation (changes only on a reset)."""
    return runtime().topology.rank


def local_size() -> int:
    """Number of workers on this host."""
    return runtime().topology.local_size


def local_rank() -> int:
    """This worker's rank among the workers on its host."""
    return runtime().topology.local_rank


def cross_size() -> int:
    """Number of hosts that have a worker with this worker's local rank."""
    return runtime().topology.cross_size


def cross_rank() -> int:
    """This host's index among the hosts that have a worker with this local rank."""
    return runtime().topology.cross_rank


def is_homogeneous() -> bool:
    """True when every host runs the same number of workers."""
    hosts = [m.host for m in runtime().generation.members]
    counts = {h: hosts.count(h) for h in hosts}
    return len(set(counts.values())) <= 1


def nccl_built() -> int:
    """Like Horovod: a truthy value (the NCCL version) when NCCL collectives are available."""
    if not (dist.is_nccl_available() and torch.cuda.is_available()):
        return 0
    version = torch.cuda.nccl.version()
    return version[0] * 1000 + version[1] * 100 + version[2] if isinstance(version, tuple) else 1


def cuda_built() -> bool:
    return torch.cuda.is_available() and dist.is_nccl_available()
