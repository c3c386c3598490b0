"""Horovod's PyTorch API on an elastic etcd rendezvous: `import elastic.torch as hvd`."""

from __future__ import annotations

from elastic.codecs.compression import Compression, Compressor
from elastic.errors import HorovodInternalError, HostsUpdatedInterrupt
from elastic.staleness.decide import NormCheck
from elastic.torch import elastic
from elastic.torch.basics import (
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    gloo_built,
    gloo_enabled,
    is_homogeneous,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rank,
    rocm_built,
    size,
    start_timeline,
    stop_timeline,
    sycl_built,
)
from elastic.torch.collectives import (
    Adasum,
    Average,
    Max,
    Min,
    Product,
    Sum,
    allgather,
    allgather_async,
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    alltoall,
    alltoall_async,
    barrier,
    broadcast,
    broadcast_,
    broadcast_async,
    broadcast_async_,
    grouped_allgather,
    grouped_allgather_async,
    grouped_allreduce,
    grouped_allreduce_,
    grouped_allreduce_async,
    grouped_allreduce_async_,
    grouped_reducescatter,
    grouped_reducescatter_async,
    join,
    poll,
    reducescatter,
    reducescatter_async,
    sparse_allreduce_async,
    synchronize,
)
from elastic.torch.exchange import StalenessRounds, TopKAllreduce
from elastic.torch.functions import (
    allgather_object,
    broadcast_object,
    broadcast_optimizer_state,
    broadcast_parameters,
)
from elastic.torch.optimizer import DistributedOptimizer
from elastic.torch.runtime import (
    ProcessSet,
    add_process_set,
    global_process_set,
    init,
    is_initialized,
    record_loss,
    remove_process_set,
    shutdown,
)
from elastic.torch.sync_batch_norm import SyncBatchNorm

__all__ = [
    "Compression", "Compressor", "HorovodInternalError", "HostsUpdatedInterrupt",
    "ccl_built", "cross_rank", "cross_size", "cuda_built", "ddl_built", "gloo_built",
    "gloo_enabled", "is_homogeneous", "local_rank", "local_size", "mpi_built", "mpi_enabled",
    "mpi_threads_supported", "nccl_built", "rank", "rocm_built", "size", "start_timeline",
    "stop_timeline", "sycl_built", "Adasum", "Average", "Max", "Min", "Product", "Sum",
    "allgather", "allgather_async", "allreduce", "allreduce_", "allreduce_async",
    "allreduce_async_", "alltoall", "alltoall_async", "barrier", "broadcast", "broadcast_",
    "broadcast_async", "broadcast_async_", "grouped_allgather", "grouped_allgather_async",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async",
    "grouped_allreduce_async_", "grouped_reducescatter", "grouped_reducescatter_async", "join",
    "poll", "reducescatter", "reducescatter_async", "synchronize", "ProcessSet",
    "sparse_allreduce_async",
    "add_process_set", "global_process_set", "init", "is_initialized", "remove_process_set",
    "shutdown", "elastic", "NormCheck", "StalenessRounds", "TopKAllreduce", "record_loss",
    "allgather_object", "broadcast_object", "broadcast_optimizer_state",
    "broadcast_parameters", "DistributedOptimizer", "SyncBatchNorm",
]
