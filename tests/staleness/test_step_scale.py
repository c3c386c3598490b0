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
from elastic.codecs.robust import MultiKrum
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
    # A history of norms like these payloads' (2.0), so a lone contributor is judged.
    rounds._version, rounds._recent_norms = version, deque([2.0, 2.0], maxlen=32)
    rounds._own_norms, rounds._evicting, rounds.node_id = {}, set(), "n0"
    rounds._max_nonfinite, rounds._nonfinite_run = 100, 0
    rounds._robust = MultiKrum(0)
    rounds._step_times, rounds._spares = deque(maxlen=16), []
    rounds._outbox_ready, rounds.on_strikes = threading.Condition(), None
    rounds.stats.strikes = Counter()
    return rounds


def message(rank: int, versions: list[int], lrs: object = None) -> torch.Tensor:
    header = {"node": f"n{rank}", "rank": rank, "round": 0, "codec": "dense-fp32",
              "finishing": False, "contribs": [[8, v] for v in versions], "step_time": 0.01}
    if lrs is not None:
        header["lrs"] = lrs
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


def test_every_member_applies_a_round_with_the_least_learning_rate_sent() -> None:
    # A schedule stepped per local step: members at different steps hold different rates
    # when an aggregate arrives; all apply it with the same, the least sent (one group
    # each here, two groups on the first member: its second is ignored, not trusted).
    rounds = rounds_of(3, version=10)
    result = rounds._aggregate(0, [message(0, [9], [0.1]), message(1, [9], [0.05]),
                                   message(2, [], [0.2, 0.0])])
    assert result.lrs == [0.05]
    assert rounds_of(2, version=10)._aggregate(0, [message(0, [9]), message(1, [9])]).lrs is None


@pytest.mark.parametrize("lrs", [[-0.1], [float("nan")], ["0.1"], [], 0.1])
def test_a_message_with_bad_learning_rates_is_rejected(lrs: object) -> None:
    rounds = rounds_of(2, version=10)
    result = rounds._aggregate(0, [message(0, [9], [0.1]), message(1, [9], lrs)])
    bad = [c for c in result.contributions if c.rank == 1]
    assert bad == [] or not bad[0].accepted
    assert result.lrs == [0.1] and rounds.stats.strikes["n1"] == 1


def exchange_for(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> StaleExchange:
    exchange = StaleExchange.__new__(StaleExchange)  # applying rounds alone
    exchange.layout = FlatLayout([param], 1 << 62)
    exchange.rounds, exchange.on_round, exchange.applied = None, None, 0
    return exchange


def result(steps: float, freshness: float, lrs: list[float] | None = None) -> RoundResult:
    c = Contribution(node="n0", rank=0, samples=8, version=0, staleness=1, weight=0.5,
                     norm=1.0, step_time=0.0, nbytes=0, accepted=True)
    return RoundResult(0, 0, 1, torch.ones(3), [c], freshness=freshness, lrs=lrs,
                       steps=steps)


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


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_a_round_is_applied_with_its_agreed_learning_rate(optimizer_class: type) -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = optimizer_class([param], lr=0.1)
    exchange = exchange_for(optimizer, param)
    exchange._apply([result(1.0, 1.0, lrs=[0.05])], TorchStepper(optimizer, optimizer.step))
    assert torch.allclose(param.detach(), torch.full((3,), -0.05), rtol=1e-4)
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_rates_for_another_number_of_param_groups_are_not_applied() -> None:
    # Every member builds the same optimizer; a round's rates for another layout are
    # ignored rather than misassigned to the wrong groups.
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.2}], lr=0.1)
    exchange = StaleExchange.__new__(StaleExchange)
    exchange.layout = FlatLayout([a, b], 1 << 62)
    exchange.rounds, exchange.on_round, exchange.applied = None, None, 0
    stepper = TorchStepper(optimizer, optimizer.step)
    assert stepper.lrs() == [0.1, 0.2]
    aggregate = RoundResult(0, 0, 1, torch.ones(6), [], lrs=[0.05])
    exchange._apply([aggregate], stepper)
    assert torch.allclose(a.detach(), torch.full((3,), -0.1))
    assert torch.allclose(b.detach(), torch.full((3,), -0.2))


def nan_message(rank: int) -> torch.Tensor:
    header = {"node": f"n{rank}", "rank": rank, "round": 0, "codec": "dense-fp32",
              "finishing": False, "contribs": [[8, 9]], "step_time": 0.01}
    return pack(header, torch.full((4,), float("nan")).view(torch.uint8))


def test_rounds_of_nothing_but_nan_stop_every_member_together_and_strike_nobody() -> None:
    from elastic.errors import NonFiniteGradientError

    rounds = rounds_of(2, version=10)
    rounds._max_nonfinite = 3
    evicted: list[str] = []
    rounds.on_strikes = lambda node, reason: evicted.append(node)
    rounds._aggregate(0, [nan_message(0), nan_message(1)])
    rounds._aggregate(1, [message(0, [9]), message(1, [9])])  # a good round: count anew
    rounds._aggregate(2, [nan_message(0), nan_message(1)])
    rounds._aggregate(3, [message(0, []), message(1, [])])  # an empty round: no change
    rounds._aggregate(4, [nan_message(0), nan_message(1)])
    with pytest.raises(NonFiniteGradientError, match="last 3 rounds .* non-finite .*"
                       r"\(HORDE_MAX_NONFINITE_STEPS=3"):
        rounds._aggregate(5, [nan_message(0), nan_message(1)])
    assert rounds.stats.strikes == Counter() and evicted == []
    assert rounds.stats.nonfinite_rounds == 4


def test_a_member_never_evicts_itself_and_evicts_a_peer_once() -> None:
    rounds = rounds_of(2, version=10)  # this member is n0
    evicted: list[str] = []
    rounds.on_strikes = lambda node, reason: evicted.append(node)
    for t in range(5):  # n1 sends NaN, then n0 does: strikes for each, past the limit
        rounds._aggregate(t, [message(0, [9]), nan_message(1)])
    for t in range(5, 10):
        rounds._aggregate(t, [nan_message(0), message(1, [9])])
    assert rounds.stats.strikes == Counter({"n0": 5, "n1": 5}), "the record is the same"
    assert evicted == ["n1"], "n1 handed over once; n0, this member's own node, never"
