"""`hvd.elastic` for PyTorch: run, State, ObjectState, TorchState, ElasticSampler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from elastic import state as _state
from elastic.core import session
from elastic.errors import HorovodInternalError, HostsUpdatedInterrupt
from elastic.torch.elastic.sampler import ElasticSampler
from elastic.torch.elastic.state import TorchState, _bcast_object, _rank, check_host_updates

State = _state.State


class ObjectState(_state.ObjectState):
    """Plain Python values as elastic state: `hvd.elastic.ObjectState(epoch=0, batch=0)`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(_bcast_object, _rank, check_host_updates, **kwargs)


def run(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: re-enter `func(state, ...)` after every membership change, in place."""
    return _state.run_fn(func, session.reset, session.reset_limit)


__all__ = ["run", "State", "ObjectState", "TorchState", "ElasticSampler",
           "HorovodInternalError", "HostsUpdatedInterrupt"]
