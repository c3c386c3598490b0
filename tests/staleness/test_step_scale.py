"""How long a step an aggregate takes (pure logic, no processes): a round that caught
several gradients of a member stands for that many of its steps (`RoundResult.steps`),
and the optimizer's step is scaled by it, through the gradient for SGD and through the
learning rate for Adam, which ignores a gradient's scale; the staleness-aware step with
the optimizer's momentum (SGD's, Adam's first beta)."""

from __future__ import annotations

import threading
from collections import Counter, deque

import pytest
import torch

from elastic.codecs import DenseCodec
from elastic.codecs.stats import RoundStats
from elastic.staleness import (
    Contribution,
    NormCheck,
    RoundResult,
    StalenessRounds,
    inverse_staleness,
)
from elastic.staleness.exchange import StaleExchange
from elastic.staleness.wire import pack
from elastic.torch.exchange import FlatLayout, TorchStepper


def rounds_of(members: int, version: int) -> StalenessRounds:
    """The round decision alone, on `members` members, at parameter version `version`."""
    rounds = StalenessRounds.__new__(StalenessRounds)
    rounds.numel, rounds.staleness, rounds.codec = 4, 2, DenseCodec()
    rounds.weight, rounds.norm_check, rounds.dtype = inverse_staleness, NormCheck(), torch.float32
    rounds.stats, rounds.generation = RoundStats(), 0
    rounds._members = [f"n{r}" for r in range(members)]
    rounds._version, rounds._recent_norms = version, deque(maxlen=32)
    rounds._step_times, rounds._spares = deque(maxlen=16), []
    rounds._outbox_ready, rounds.on_strikes = threading.Condition(), None
    rounds.stats.strikes = Counter()
    return rounds


def message(rank: int, versions: list[int]) -> torch.Tensor:
    header = {"node": f"n{rank}", "rank": rank, "round": 0, "codec": "dense-fp32",
              "finishing": False, "contribs": [[8, v] for v in versions], "step_time": 0.01}
    payload = torch.ones(4).view(torch.uint8) if versions else torch.empty(0, dtype=torch.uint8)
    return pack(header, payload)


@pytest.mark.parametrize(("versions", "steps"), [
    ([[9], [9]], 1.0),          # one gradient of each member: one step
    ([[9, 9], [9, 9]], 2.0),    # two of each (compute outpaced the rounds): two steps
    ([[9, 9], [9]], 1.5),
    ([[9, 9], []], 2.0),        # an absent member does not shorten the others' steps
    ([[9, 9], [6]], 2.0)])      # one dropped as too stale (3 > S=2) does not count
def test_a_round_stands_for_as_many_steps_as_its_members_took(
        versions: list[list[int]], steps: float) -> None:
    rounds = rounds_of(2, version=9 + 1)
    result = rounds._aggregate(0, [message(r, v) for r, v in enumerate(versions)])
    assert result.aggregate is not None
    assert result.steps == steps
    assert torch.allclose(result.aggregate, torch.ones(4))  # still an average


def exchange_for(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> StaleExchange:
    exchange = StaleExchange.__new__(StaleExchange)  # applying rounds alone
    exchange.layout = FlatLayout([param], 1 << 62)
    exchange.rounds, exchange.on_round, exchange.applied = None, None, 0
    return exchange


def result(steps: float, freshness: float) -> RoundResult:
    c = Contribution(node="n0", rank=0, samples=8, version=0, staleness=1, weight=0.5,
                     norm=1.0, step_time=0.0, nbytes=0, accepted=True)
    return RoundResult(0, 0, 1, torch.ones(3), [c], freshness=freshness, steps=steps)


@pytest.mark.parametrize(("momentum", "expected"), [(0.0, 2.0), (0.9, 1.0)])
def test_sgd_steps_by_the_rounds_steps_and_with_momentum_its_freshness(
        momentum: float, expected: float) -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=momentum)
    exchange = exchange_for(optimizer, param)
    exchange._apply([result(steps=2.0, freshness=0.5)], TorchStepper(optimizer, optimizer.step))
    assert torch.allclose(param.detach(), torch.full((3,), -0.1 * expected))
    assert exchange.applied == 1


@pytest.mark.parametrize(("steps", "freshness", "expected"), [(2.0, 1.0, 2.0), (1.0, 0.5, 0.5),
                                                              (2.0, 0.5, 1.0)])
def test_adam_steps_through_its_learning_rate_and_gets_it_back(
        steps: float, freshness: float, expected: float) -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([param], lr=0.01)
    exchange = exchange_for(optimizer, param)
    exchange._apply([result(steps, freshness)], TorchStepper(optimizer, optimizer.step))
    # Adam's first step moves each entry by lr whatever the gradient's scale.
    assert torch.allclose(param.detach(), torch.full((3,), -0.01 * expected), rtol=1e-4)
    assert optimizer.param_groups[0]["lr"] == 0.01  # a scheduler sees its own value
