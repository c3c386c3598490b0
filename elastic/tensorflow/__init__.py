"""Horovod's TensorFlow 2 API on Horde's elastic runtime: `import elastic.tensorflow as hvd`.

Needs the `tensorflow` extra (`pip install -e ".[tensorflow]"`). Collectives run on
Horde's shared engine (torch.distributed Gloo on CPU tensors); tensors cross over as
NumPy arrays. Keras users import `elastic.tensorflow.keras` instead.
"""

from __future__ import annotations

try:
    import tensorflow as _tf  # noqa: F401
except ImportError as _exc:  # pragma: no cover - depends on the installation
    raise ImportError("elastic.tensorflow needs TensorFlow: pip install 'horde[tensorflow]' "
                      "(tensorflow-cpu 2.21 with Keras 3)") from _exc

from elastic.tensorflow import elastic
from elastic.tensorflow._core_bridge import (
    HorovodInternalError,
    HostsUpdatedInterrupt,
    ProcessSet,
    add_process_set,
    ccl_built,
    cross_rank,
    cross_size,
    ddl_built,
    global_process_set,
    gloo_built,
    gloo_enabled,
    init,
    is_homogeneous,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    rank,
    record_loss,
    remove_process_set,
    rocm_built,
    shutdown,
    size,
    start_timeline,
    stop_timeline,
    sycl_built,
)
from elastic.tensorflow.compression import Compression, Compressor
from elastic.tensorflow.functions import (
    allgather_object,
    broadcast_object,
    broadcast_object_fn,
    broadcast_variables,
)
from elastic.tensorflow.gradient_tape import DistributedGradientTape, apply_gradients_if_finite
from elastic.tensorflow.mpi_ops import (
    Adasum,
    Average,
    Max,
    Min,
    Product,
    Sum,
    allgather,
    allreduce,
    alltoall,
    barrier,
    broadcast,
    broadcast_,
    grouped_allgather,
    grouped_allreduce,
    grouped_reducescatter,
    join,
    local_rank_op,
    local_size_op,
    rank_op,
    reducescatter,
    size_op,
)


def nccl_built() -> int:
    return 0


def cuda_built() -> bool:
    return False


__all__ = [
    "HorovodInternalError", "HostsUpdatedInterrupt", "ProcessSet", "add_process_set",
    "cross_rank", "cross_size", "global_process_set", "gloo_built", "init", "is_homogeneous",
    "is_initialized", "local_rank", "local_size", "rank", "remove_process_set", "shutdown",
    "size", "start_timeline", "stop_timeline", "Compression", "Compressor",
    "allgather_object", "broadcast_object", "broadcast_object_fn", "broadcast_variables",
    "DistributedGradientTape", "apply_gradients_if_finite", "Adasum", "Average", "Max",
    "Min", "Product", "Sum",
    "allgather", "allreduce", "alltoall", "barrier", "broadcast", "broadcast_",
    "grouped_allgather", "grouped_allreduce", "grouped_reducescatter", "join",
    "local_rank_op", "local_size_op", "rank_op", "reducescatter", "size_op", "elastic",
    "gloo_enabled", "mpi_enabled", "mpi_built", "mpi_threads_supported", "nccl_built",
    "ddl_built", "ccl_built", "cuda_built", "rocm_built", "sycl_built", "record_loss",
]
