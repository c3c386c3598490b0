"""Horovod's helper functions: broadcast model and optimizer state, and Python objects.

Every function issues the same collectives in the same order on every rank of the
process set, whatever the local state looks like, so ranks whose state differs (a
fresh optimizer on a newcomer, say) still meet the root in each collective.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from elastic import serialization
from elastic.core.engine import Kind, Request
from elastic.errors import ObjectNotAllowedError
from elastic.torch import collectives
from elastic.torch.collectives import Max, allgather, allreduce, broadcast_
from elastic.torch.runtime import ProcessSet, context, global_process_set

logger = logging.getLogger(__name__)


# -- objects --------------------------------------------------------------------------
# Peer bytes are data, never code (elastic/serialization.py): a rank whose object is not
# plain data announces a size of -1 instead, so every rank skips the payload and raises
# at the same collective, and no rank waits for bytes that never come.

_REFUSED = -1


def _trusted() -> bool:
    return context().settings.trusted_peers


def _max_object_bytes() -> int:
    return context().settings.max_object_bytes


def _encode(obj: Any, safe: Sequence[Any]) -> tuple[torch.Tensor | None,
                                                    ObjectNotAllowedError | None]:
    blob, refusal = serialization.describe(
        lambda: serialization.encode(obj, _trusted(), safe))
    if blob is None:
        return None, refusal
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8), None


def _decode(data: torch.Tensor, source: str, safe: Sequence[Any]) -> Any:
    return serialization.decode(data.numpy().tobytes(), _trusted(), source, safe)


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> Any:
    """Return rank `root_rank`'s `obj` on every rank (other ranks' `obj` is ignored).

    `obj` must be plain data (tensors, numbers, strings, containers, numpy arrays, state
    dicts) unless the job trusts its peers (`horderun --trusted-peers`); otherwise every
    rank raises ObjectNotAllowedError. The default name does not depend on `obj`, so
    non-root ranks may pass None.
    """
    return _broadcast_object(obj, root_rank, name, process_set, ())


def _broadcast_object(obj: Any, root_rank: int, name: str | None, process_set: ProcessSet,
                      safe: Sequence[Any]) -> Any:
    """`broadcast_object` that also accepts the types in `safe` (Horde's own placeholders)."""
    me = process_set.member_rank("broadcast_object")
    collectives._check_root(root_rank, process_set)
    name = name or "broadcast_object"
    refusal = None
    if me == root_rank:
        payload, refusal = _encode(obj, safe)
        size = _REFUSED if payload is None else payload.numel()
        length = torch.tensor([size], dtype=torch.int64)
    else:
        payload = None
        length = torch.zeros(1, dtype=torch.int64)
    broadcast_(length, root_rank, name=f"{name}.sz", process_set=process_set)
    size = int(length.item())
    if size < 0:
        if refusal is not None:
            raise refusal
        raise ObjectNotAllowedError(
            f"broadcast_object: rank {root_rank} could not send its object (it is not plain "
            f"data; rank {root_rank}'s error names the type); {serialization.OPT_IN}")
    serialization.check_sizes("broadcast_object", [0] * root_rank + [size],
                              _max_object_bytes())
    if payload is None:
        payload = torch.empty(size, dtype=torch.uint8)
    broadcast_(payload, root_rank, name=f"{name}.t", process_set=process_set)
    return obj if me == root_rank else _decode(payload, f"rank {root_rank}", safe)


def allgather_object(obj: Any, name: str | None = None,
                     process_set: ProcessSet = global_process_set) -> list[Any]:
    """Every rank's `obj`, as a list in rank order of the process set.

    Each `obj` must be plain data unless the job trusts its peers (see broadcast_object).
    """
    process_set.member_rank("allgather_object")
    name = name or "allgather_object"
    payload, refusal = _encode(obj, ())
    size = _REFUSED if payload is None else payload.numel()
    sizes = allgather(torch.tensor([size], dtype=torch.int64), name=f"{name}.sz",
                      process_set=process_set).tolist()
    refused = [rank for rank, n in enumerate(sizes) if n < 0]
    if refused:
        if refusal is not None:
            raise refusal
        raise ObjectNotAllowedError(
            f"allgather_object: rank(s) {refused} could not send their objects (not plain "
            f"data; their errors name the types); {serialization.OPT_IN}")
    serialization.check_sizes("allgather_object", sizes, _max_object_bytes())
    assert payload is not None
    gathered = allgather(payload, name=f"{name}.t", process_set=process_set)
    out: list[Any] = []
    offset = 0
    for rank, n in enumerate(sizes):
        out.append(_decode(gathered[offset:offset + n], f"rank {rank}", ()))
        offset += n
    return out


# -- tensors --------------------------------------------------------------------------

def _grouped_broadcast_(tensors: list[torch.Tensor], root_rank: int, name: str,
                        process_set: ProcessSet) -> None:
    """Broadcast `tensors` in place from `root_rank` as one negotiated request."""
    collectives._check_root(root_rank, process_set)
    targets = [t.detach() if t.is_contiguous() else t.detach().contiguous() for t in tensors]
    request = Request(Kind.BROADCAST, targets, name=name, root=root_rank,
                      process_set_id=collectives._pset(process_set))
    collectives._submit(request).result()
    for tensor, target in zip(tensors, targets):
        if target.data_ptr() != tensor.data_ptr():
            with torch.no_grad():
                tensor.copy_(target)


def _keys_name(prefix: str, keys: Iterable[Any]) -> str:
    """An op name that differs when the ranks' key lists differ (caught by negotiation)."""
    digest = hashlib.blake2b("\n".join(map(str, keys)).encode(), digest_size=6).hexdigest()
    return f"{prefix}.{digest}"


def _sort_key(item: tuple[Any, Any]) -> tuple[str, str]:
    return (type(item[0]).__name__, str(item[0]))


def broadcast_parameters(params: Mapping[Any, Any] | list[Any], root_rank: int,
                         process_set: ProcessSet = global_process_set) -> None:
    """Overwrite every tensor of `params` with rank `root_rank`'s value, in place.

    `params` is a `state_dict()`-like mapping (broadcast in sorted key order) or a
    list of tensors or `(name, tensor)` pairs such as `list(model.named_parameters())`.
    Non-tensor values of a mapping are replaced by the root's values.
    """
    process_set.member_rank("broadcast_parameters")
    if isinstance(params, Mapping):
        items = sorted(params.items(), key=_sort_key)
    elif isinstance(params, list):
        items = [p if isinstance(p, tuple) else (None, p) for p in params]
    else:
        raise ValueError(f"invalid params of type {type(params).__name__}: pass a dict such as "
                         "model.state_dict() or a list such as list(model.named_parameters())")
    tensors: list[torch.Tensor] = []
    others: dict[Any, Any] = {}
    for index, item in enumerate(items):
        if len(item) != 2:
            raise ValueError(f"params entry {index} is not a (name, tensor) pair")
        key, value = item
        if isinstance(value, torch.Tensor):
            tensors.append(value)
        elif isinstance(params, Mapping):
            others[key] = value
        else:
            label = key if key is not None else f"#{index}"
            raise TypeError(f"broadcast_parameters: entry {label} is a {type(value).__name__}, "
                            "not a torch.Tensor")
    keys = [f"{key}:{'t' if isinstance(v, torch.Tensor) else 'o'}" for key, v in items]
    _grouped_broadcast_(tensors, root_rank, _keys_name("broadcast_parameters", keys), process_set)
    if others:
        synced = broadcast_object(others, root_rank, name="broadcast_parameters.objects",
                                  process_set=process_set)
        params.update(synced)  # type: ignore[union-attr]


# -- optimizer state ------------------------------------------------------------------

class _TensorSlot:
    """Placeholder for a tensor in the root's optimizer description."""

    def __init__(self, tensor: torch.Tensor, param: torch.Tensor | None) -> None:
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.on_param_device = param is not None and tensor.device == param.device \
            and tensor.device.type != "cpu"


def _describe_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]
                        ) -> dict[str, Any]:
    """The root's hyperparameters and state, with tensors replaced by placeholders."""
    groups = []
    for group in optimizer.param_groups:
        options = {k: (_TensorSlot(v, None) if isinstance(v, torch.Tensor) else v)
                   for k, v in group.items() if k != "params"}
        groups.append((len(group["params"]), options))
    index = {id(p): i for i, p in enumerate(params)}
    state = []
    for param, entry in optimizer.state.items():
        if id(param) not in index:
            continue
        fields = [(k, _TensorSlot(v, param) if isinstance(v, torch.Tensor) else v)
                  for k, v in entry.items()]
        state.append((index[id(param)], fields))
    state.sort(key=lambda item: item[0])
    return {"groups": groups, "state": state}


def _structure_problem(optimizer: torch.optim.Optimizer, described: dict[str, Any]) -> str:
    mine = [len(g["params"]) for g in optimizer.param_groups]
    root = [n for n, _ in described["groups"]]
    if mine != root:
        return (f"the optimizer has param groups of sizes {mine} but the root's has {root}; "
                "build the same model and optimizer on every rank")
    return ""


def _slot_tensor(slot: _TensorSlot, existing: Any, param: torch.Tensor | None) -> torch.Tensor:
    if (isinstance(existing, torch.Tensor) and tuple(existing.shape) == slot.shape
            and existing.dtype == slot.dtype):
        return existing
    if isinstance(existing, torch.Tensor) and existing.device.type != "cpu":
        device = existing.device
    elif slot.on_param_device and param is not None:
        device = param.device
    else:
        device = torch.device("cpu")
    return torch.zeros(slot.shape, dtype=slot.dtype, device=device)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int,
                              process_set: ProcessSet = global_process_set) -> None:
    """Make every rank's optimizer state and hyperparameters equal to rank `root_rank`'s.

    Ranks whose state is missing or partial (a fresh optimizer) get the root's layout;
    when the root's state is empty, every rank ends with an empty state.
    """
    me = process_set.member_rank("broadcast_optimizer_state")
    collectives._check_root(root_rank, process_set)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    described = _describe_optimizer(optimizer, params) if me == root_rank else None
    described = _broadcast_object(described, root_rank, "broadcast_optimizer_state",
                                  process_set, (_TensorSlot,))
    problem = _structure_problem(optimizer, described)
    # Agree before touching anything, so a misfit rank fails everywhere at once.
    flag = allreduce(torch.tensor([1 if problem else 0], dtype=torch.int32), op=Max,
                     name="broadcast_optimizer_state.check", process_set=process_set)
    if int(flag.item()):
        raise ValueError("broadcast_optimizer_state: "
                         + (problem or "another rank's optimizer does not match the root's"))

    targets: list[torch.Tensor] = []
    for group, (_, options) in zip(optimizer.param_groups, described["groups"]):
        for key, value in options.items():
            if isinstance(value, _TensorSlot):
                tensor = _slot_tensor(value, group.get(key), None)
                group[key] = tensor
                targets.append(tensor)
            else:
                group[key] = value
    rooted = set()
    for index, fields in described["state"]:
        param = params[index]
        rooted.add(id(param))
        local = optimizer.state.setdefault(param, {})
        wanted = {k for k, _ in fields}
        for key in [k for k in local if k not in wanted]:
            del local[key]
        for key, value in fields:
            if isinstance(value, _TensorSlot):
                tensor = _slot_tensor(value, local.get(key), param)
                local[key] = tensor
                targets.append(tensor)
            else:
                local[key] = value
    for param in [p for p in optimizer.state if id(p) not in rooted]:
        del optimizer.state[param]
    if me == root_rank:
        logger.debug("broadcasting optimizer state: %d tensors", len(targets))
    _grouped_broadcast_(targets, root_rank, "broadcast_optimizer_state.tensors", process_set)


__all__ = ["broadcast_parameters", "broadcast_optimizer_state", "broadcast_object",
           "allgather_object"]
