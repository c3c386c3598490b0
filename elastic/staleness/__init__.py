"""Bounded staleness, framework-neutral: the round's wire format (`wire`), its decision as a
pure function (`decide`), and the thread that runs rounds on a generation (`rounds`)."""

from __future__ import annotations

from elastic.staleness.decide import (
    Contribution,
    Entry,
    NormCheck,
    Refusal,
    RoundDecision,
    decide_round,
    inverse_staleness,
)
from elastic.staleness.rounds import ROUNDS_SET_ID, RoundResult, StalenessRounds

__all__ = [
    "Contribution", "Entry", "NormCheck", "ROUNDS_SET_ID", "Refusal", "RoundDecision",
    "RoundResult", "StalenessRounds", "decide_round", "inverse_staleness",
]
