"""`DistributedOptimizer`'s top-k and staleness arguments: misuse is refused at once,
with a message that names the argument (checked before `hvd.init()` is needed)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import elastic.torch as hvd


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.1)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"staleness": -1}, ValueError, "staleness=-1 must be an integer >= 0"),
    ({"staleness": True}, ValueError, "staleness=True must be an integer"),
    ({"staleness": 1.5}, ValueError, "staleness=1.5 must be an integer"),
    ({"staleness": 1, "round_deadline": -0.1}, ValueError, "round_deadline=-0.1"),
    ({"staleness": 1, "op": hvd.Sum}, ValueError, "use op=hvd.Average"),
    ({"compression": hvd.Compression.topk(0.01), "backward_passes_per_step": 2}, ValueError,
     "backward_passes_per_step"),
    ({"staleness": 1, "norm_check": {"factor": 5}}, TypeError,
     "norm_check must be an elastic.rounds.NormCheck, got dict"),
    ({"norm_check": hvd.NormCheck(factor=5)}, ValueError,
     "norm_check applies to the rounds of staleness >= 1"),
])
def test_misuse_is_refused_with_the_argument_named(kwargs: dict[str, Any],
                                                   error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        hvd.DistributedOptimizer(optimizer(), **kwargs)
