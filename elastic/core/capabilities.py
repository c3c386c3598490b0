"""What a Horde build supports, in Horovod's terms, the same for every frontend.

Collectives run on torch.distributed Gloo (NCCL for CUDA tensors in elastic.torch, which
answers `nccl_built`/`cuda_built` itself); there is no MPI, DDL, oneCCL, ROCm or SYCL path.
"""

from __future__ import annotations

import torch.distributed as dist


def gloo_enabled() -> bool:
    return True


def gloo_built() -> bool:
    return dist.is_gloo_available()


def mpi_enabled() -> bool:
    return False


def mpi_built() -> bool:
    return False


def mpi_threads_supported() -> bool:
    return False


def ddl_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def rocm_built() -> bool:
    return False


def sycl_built() -> bool:
    return False


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Accepted for compatibility; Horde has no timeline (use the framework's profiler)."""


def stop_timeline() -> None:
    """Accepted for compatibility; see `start_timeline`."""
