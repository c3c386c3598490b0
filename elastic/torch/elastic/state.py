"""`hvd.elastic.TorchState`: models, optimizers, samplers and plain values as elastic state."""

from __future__ import annotations

import copy
from typing import Any

import torch

from elastic.core.session import check_host_updates
from elastic.state import ObjectState
from elastic.torch.elastic.sampler import ElasticSampler


def _functions() -> Any:
    from elastic.torch import functions

    return functions


def _bcast_object(obj: Any) -> Any:
    return _functions().broadcast_object(obj, root_rank=0)


def _rank() -> int:
    from elastic.torch.basics import rank

    return rank()


class _Handler:
    """Saves, restores and synchronizes one value of a TorchState."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.save()

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError


class _ModelHandler(_Handler):
    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self._saved)

    def sync(self) -> None:
        _functions().broadcast_parameters(self.value.state_dict(), root_rank=0)


class _OptimizerHandler(_Handler):
    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self._saved)

    def sync(self) -> None:
        _functions().broadcast_optimizer_state(self.value, root_rank=0)


class _SamplerHandler(_Handler):
    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        self.value.load_state_dict(self._saved)

    def sync(self) -> None:
        state = _bcast_object(self.value.state_dict())
        self.value.load_state_dict(state)
        self._saved = copy.deepcopy(state)


def _handler_for(value: Any) -> type[_Handler] | None:
    if isinstance(value, torch.nn.Module):
        return _ModelHandler
    if isinstance(value, torch.optim.Optimizer):
        return _OptimizerHandler
    if isinstance(value, ElasticSampler):
        return _SamplerHandler
    return None


class TorchState(ObjectState):
    """Elastic state of a PyTorch job: `TorchState(model, optimizer, epoch=0, batch=0, ...)`.

    Modules, optimizers and ElasticSamplers are saved through their state_dicts and
    synchronized by broadcast from rank 0; any other keyword is a plain value.
    """

    def __init__(self, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        objects = dict(kwargs)
        if model is not None:
            objects["model"] = model
        if optimizer is not None:
            objects["optimizer"] = optimizer
        self._handlers: dict[str, _Handler] = {}
        plain: dict[str, Any] = {}
        for name, value in objects.items():
            handler = _handler_for(value)
            if handler is None:
                plain[name] = value
            else:
                self._handlers[name] = handler(value)
                object.__setattr__(self, name, value)
        super().__init__(_bcast_object, _rank, check_host_updates, **plain)

    def save(self) -> None:
        for handler in self._handlers.values():
            finish = getattr(handler.value, "finish", None)
            if isinstance(handler, _OptimizerHandler) and callable(finish):
                finish()  # staleness: apply what is in flight, so every member saves alike
        for handler in self._handlers.values():
            handler.save()
        super().save()

    def restore(self) -> None:
        for handler in self._handlers.values():
            handler.restore()
        super().restore()

    def sync(self) -> None:
        for handler in self._handlers.values():
            handler.sync()
        super().sync()

    def __setattr__(self, name: str, value: Any) -> None:
        handlers = self.__dict__.get("_handlers")
        if handlers and name in handlers:
            handlers[name].value = value
        object.__setattr__(self, name, value)
