"""Horovod's TensorFlow helpers: broadcast variables and Python objects, gather objects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from elastic.tensorflow import _core_bridge as core
from elastic.tensorflow._core_bridge import ProcessSet, global_process_set
from elastic.tensorflow.mpi_ops import _check_root, _guarded, _run


def broadcast_variables(variables: Sequence[tf.Variable], root_rank: int,
                        process_set: ProcessSet = global_process_set,
                        inplace: bool = False) -> Any:
    """Assign rank `root_rank`'s value to every variable, on every rank of the set.

    One request carries all variables, keyed by position, shape and dtype (not by name:
    Keras numbers layer names per process), so ranks whose variable lists differ fail
    together instead of exchanging mismatched values.
    Works eagerly and inside `tf.function`; returns the assign ops' group.
    """
    variables = list(variables)
    _check_root(root_rank, process_set)
    if not variables:
        return tf.group()
    values = [tf.convert_to_tensor(v) for v in variables]
    keys = [f"{i}:{v.shape}:{v.dtype.name}" for i, v in enumerate(values)]

    def fn(*arrays: Any) -> list[Any]:
        return core.broadcast_many(list(zip(keys, arrays)), root_rank, process_set)

    synced = _run(fn, values, [v.dtype for v in values], [v.shape for v in values])
    return tf.group(*[var.assign(value) for var, value in zip(variables, synced)])


def broadcast_object(obj: Any, root_rank: int = 0, session: Any = None,
                     name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> Any:
    """Rank `root_rank`'s `obj` on every rank (serialized; eager only, as in Horovod TF2)."""
    _check_root(root_rank, process_set)
    return _guarded(core.broadcast_object, obj, root_rank, name, process_set)


def broadcast_object_fn(root_rank: int = 0, session: Any = None, name: str | None = None,
                        process_set: ProcessSet = global_process_set) -> Any:
    """A function that broadcasts its argument from `root_rank` (Horovod's helper)."""
    return lambda obj: broadcast_object(obj, root_rank, session, name, process_set)


def allgather_object(obj: Any, session: Any = None, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> list[Any]:
    """Every rank's `obj`, in rank order of the process set."""
    return _guarded(core.allgather_object, obj, name, process_set)


__all__ = ["broadcast_variables", "broadcast_object", "broadcast_object_fn",
           "allgather_object"]
