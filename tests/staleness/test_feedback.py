"""What a member's top-k contribution did not put into the parameters goes back to its
residual (pure logic, no processes): all of one dropped as too stale, 1 - w(s) of one
that took a shorter step (the optimizer's momentum), nothing of a rejected one; and how
much of the next gradient enters top-k's own velocity."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from elastic.codecs import PayloadCodec, TopKCompressor
from elastic.staleness import Contribution, RoundResult
from elastic.staleness.exchange import StaleExchange
from elastic.torch.exchange import FlatLayout, TorchStepper


def codec(momentum: float = 0.0) -> PayloadCodec:
    params = [torch.nn.Parameter(torch.zeros(2048))]
    return PayloadCodec(FlatLayout(params, 1024),
                        TopKCompressor(0.01, momentum=momentum), world_size=2)


def contribution(rank: int, staleness: int, accepted: bool, reason: str = "") -> Contribution:
    return Contribution(node=f"n{rank}", rank=rank, samples=8, version=0, staleness=staleness,
                        weight=1.0 / (1 + staleness) if accepted else 0.0, norm=1.0,
                        step_time=0.0, nbytes=0, accepted=accepted, reason=reason)


@pytest.mark.parametrize("applied", [0.0, 0.5, 1.0])
def test_the_unapplied_part_of_a_sent_gradient_returns_to_the_residual(applied: float) -> None:
    c = codec()
    gradient = torch.randn(2048, generator=torch.Generator().manual_seed(0))
    c.encode(gradient, 0)
    sent = gradient - c.compressor.residual("gradients")
    assert int((sent != 0).sum()) == 20
    c.settle(applied)
    expected = gradient - applied * sent
    assert torch.allclose(c.compressor.residual("gradients"), expected, atol=1e-6)
    assert not c.sent, "settled gradients are forgotten"


@pytest.mark.parametrize(("momentum", "optimizer_momentum", "expected", "intake"), [
    (0.9, 0.0, [0.0, 1.0, 1.0], 0.5),  # top-k's momentum: damped where gradients enter it
    (0.0, 0.9, [0.0, 0.5, 1.0], 0.5),  # the optimizer's momentum: half a step
    (0.0, 0.0, [0.0, 1.0, 1.0], 0.5)])
def test_each_own_contribution_settles_by_what_became_of_it(
        momentum: float, optimizer_momentum: float, expected: list[float],
        intake: float) -> None:
    exchange = StaleExchange.__new__(StaleExchange)  # the settling logic alone
    exchange.staleness = 1
    optimizer = TorchStepper(SimpleNamespace(param_groups=[{"momentum": optimizer_momentum}]),
                             lambda: None)
    settled: list[float] = []
    exchange.rounds = SimpleNamespace(rank=1, codec=codec(momentum))
    exchange.rounds.codec.settle = settled.append
    exchange.compressor = exchange.rounds.codec.compressor
    result = RoundResult(0, 5, 3, None, [
        contribution(0, 1, True),                                        # another member's
        contribution(1, 2, False, "staleness 2 exceeds 1"),              # dropped
        contribution(1, 1, True),                                        # accepted, 1 old
        contribution(1, 0, False, "norm 1e4 exceeds 10x the recent median")])  # rejected
    exchange._settle(result, exchange._damped(optimizer))
    assert settled == expected
    # The next gradient is likely as stale as the last accepted one: w(1) of it enters
    # the compressor's velocity.
    assert exchange.rounds.codec.intake == intake
