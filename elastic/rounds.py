"""Former home of the staleness rounds; the names docs/staleness.md gives, kept for scripts.

The rounds now live in `elastic.staleness` (wire format, decision, thread) and the codecs
in `elastic.codecs`. `StalenessRounds` here is `hvd.StalenessRounds`: it runs in the
current generation.
"""

from __future__ import annotations

from elastic.codecs.base import Codec, DenseCodec
from elastic.codecs.stats import RoundStats
from elastic.staleness.decide import Contribution, NormCheck, Refusal, inverse_staleness
from elastic.staleness.rounds import RoundResult
from elastic.torch.exchange import StalenessRounds

__all__ = [
    "Codec", "Contribution", "DenseCodec", "NormCheck", "Refusal", "RoundResult", "RoundStats",
    "StalenessRounds", "inverse_staleness",
]
