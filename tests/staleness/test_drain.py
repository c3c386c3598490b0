"""With staleness, Horovod's ways of ending training leave every member with the same
parameters: `optimizer.synchronize()`, `state.commit()` and `hvd.shutdown()` apply what is
in flight on every member together (as `optimizer.finish()` does), and training can go
on after the first two."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import run_workers_json

SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "drain_worker.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@pytest.mark.parametrize("end", ["synchronize", "commit", "shutdown"])
def test_ending_the_horovod_way_leaves_identical_parameters(tmp_path: Path, end: str) -> None:
    ranks = run_workers_json(tmp_path, 2, SCRIPT, END=end)
    assert ranks[0]["params"] == ranks[1]["params"], "members' parameters differ"
    if end != "shutdown":  # called mid-way too; training went on in new rounds
        assert ranks[0]["mid"] == ranks[1]["mid"], "members differ after the mid-way call"
        assert ranks[0]["mid"] != ranks[0]["params"]
    stats = [r["stats"] for r in ranks]
    assert stats[0]["accepted"] == stats[1]["accepted"] > 0, stats
