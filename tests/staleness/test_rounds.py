"""Bounded-staleness rounds across real processes: identical parameters, bounded staleness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import run_workers_json

SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "rounds_worker.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def run(tmp_path: Path, np: int, **env: str) -> list[dict]:
    return run_workers_json(tmp_path, np, SCRIPT, **env)


def common_rounds(ranks: list[dict]) -> list[int]:
    seen = [{e["round"] for e in r["log"]} for r in ranks]
    return sorted(set.intersection(*seen))


def test_members_apply_identical_aggregates_and_a_slow_worker_does_not_stall(
        tmp_path: Path) -> None:
    ranks = run(tmp_path, 3, STALENESS="3", SLOW_RANK="2", FAST_STEP="0.02", SLOW_STEP="0.05",
                STEPS="40")
    rounds = common_rounds(ranks)
    assert len(rounds) >= 40
    by_round = [{e["round"]: e for e in r["log"]} for r in ranks]
    for t in rounds:
        hashes = {b[t]["hash"] for b in by_round}
        assert len(hashes) == 1, f"members diverged at round {t}"
        assert len({json.dumps(b[t]["contributions"]) for b in by_round}) == 1
    entries = [by_round[0][t] for t in rounds]
    # Rounds closed without the slow worker: the fast ones did not wait for it.
    without_slow = [e for e in entries
                    if {c[0] for c in e["contributions"]} == {0, 1}]
    assert without_slow, "every round waited for the slow worker"
    slow_accepted = [c for e in entries for c in e["contributions"] if c[0] == 2 and c[2]]
    assert slow_accepted, "the slow worker's samples were never accepted"
    assert all(c[1] <= 3 for c in slow_accepted)
    stats = ranks[0]["stats"]
    assert max(int(s) for s in stats["staleness_histogram"]) <= 3


def test_contributions_staler_than_the_bound_are_dropped_and_counted(tmp_path: Path) -> None:
    ranks = run(tmp_path, 2, STALENESS="1", SLOW_RANK="1", FAST_STEP="0.01", SLOW_STEP="0.08",
                STEPS="60")
    dropped = [r["stats"]["dropped_stale"] for r in ranks]
    assert dropped[0] > 0 and dropped[0] == dropped[1], dropped
    by_round = [{e["round"]: e for e in r["log"]} for r in ranks]
    for t in common_rounds(ranks):
        assert by_round[0][t]["hash"] == by_round[1][t]["hash"]
        for _rank, staleness, accepted in by_round[0][t]["contributions"]:
            assert accepted == (staleness <= 1)


def test_a_malformed_message_costs_its_sender_a_strike_not_the_generation(
        tmp_path: Path) -> None:
    ranks = run(tmp_path, 3, STALENESS="2", MALFORM_RANK="1", STEPS="20")
    by_round = [{e["round"]: e for e in r["log"]} for r in ranks]
    for t in common_rounds(ranks):
        assert len({b[t]["hash"] for b in by_round}) == 1, f"members diverged at round {t}"
    stats = [r["stats"] for r in ranks]
    assert all(s["rejected"] == 1 for s in stats), stats
    assert all(len(s["strikes"]) == 1 and list(s["strikes"].values()) == [1] for s in stats)
    assert stats[0]["strikes"] == stats[1]["strikes"] == stats[2]["strikes"]


@pytest.mark.parametrize(("staleness", "parts"), [("1", "1"), ("3", "1"), ("3", "0")])
def test_every_aggregate_is_the_weighted_average_of_what_the_round_accepted(
        tmp_path: Path, staleness: str, parts: str) -> None:
    """Members' several pending gradients, combined into one payload or (codecs that
    encode each gradient) sent as parts of one message, each weighted by its own
    staleness and samples."""
    ranks = run(tmp_path, 3, STALENESS=staleness, PARTS=parts, CHECK="1", FAST_STEP="0.002",
                SLOW_RANK="2", SLOW_STEP="0.03", STEPS="40")
    by_round = [{e["round"]: e for e in r["log"]} for r in ranks]
    for t in common_rounds(ranks):
        assert len({b[t]["hash"] for b in by_round}) == 1, f"members diverged at round {t}"
    for r in ranks:
        checks = r["checks"]
        assert checks["aggregates"] > 0 and checks["wrong"] == 0, checks
        assert checks["no_payload"] == 0, checks
    stats = ranks[0]["stats"]
    if staleness == "3":  # several gradients in one message: the case parts exist for
        assert max(r["checks"]["most_parts"] for r in ranks) >= 2
    assert max(int(s) for s in stats["staleness_histogram"]) <= int(staleness)
