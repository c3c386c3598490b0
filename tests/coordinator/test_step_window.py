"""Synchronous steps are reported in spans; the ledger credits them exactly."""

from __future__ import annotations

import pytest

from elastic.credit.reports import StepWindow
from elastic.settings import WorkerSettings
from tests.coordinator.helpers import credit_of, post_reports, register

MEMBERS = ["a", "b", "c"]


def spans(reports: list[dict]) -> list[tuple[int, int, int]]:
    return [(r["generation"], r["round"], r.get("span", 1)) for r in reports]


def test_a_span_is_reported_once_the_step_after_it_completed() -> None:
    window = StepWindow(4)
    due = [spans(window.add("j", 1, MEMBERS, [1, 2, 3])) for _ in range(10)]
    assert due == [[], [], [], [], [(1, 0, 4)], [], [], [], [(1, 4, 4)], []]
    assert spans(window.flush()) == [(1, 8, 1), (1, 9, 1)]
    assert window.flush() == []


def test_samples_are_summed_per_member_over_the_span() -> None:
    window = StepWindow(2)
    window.add("j", 1, MEMBERS, [1, 2, 3])
    window.add("j", 1, MEMBERS, [4, 5, 6])
    (report,) = window.add("j", 1, MEMBERS, [0, 0, 0])
    assert report["span"] == 2 and report["members"] == MEMBERS
    assert [c["samples"] for c in report["contributions"]] == [5, 7, 9]
    assert all(c["accepted"] and c["staleness"] == 0 and c["param_version"] == 0
               for c in report["contributions"])


def test_a_new_generation_reports_the_old_tail_one_step_at_a_time() -> None:
    window = StepWindow(4)
    for _ in range(3):
        window.add("j", 1, MEMBERS, [1, 1, 1])
    due = window.add("j", 2, ["a", "b"], [1, 1])
    assert spans(due) == [(1, 0, 1), (1, 1, 1), (1, 2, 1)]
    assert [r["members"] for r in due] == [MEMBERS] * 3
    assert [window.add("j", 2, ["a", "b"], [1, 1]) for _ in range(3)] == [[], [], []]
    assert spans(window.add("j", 2, ["a", "b"], [1, 1])) == [(2, 0, 4)]


def test_span_one_reports_every_step_at_once() -> None:
    window = StepWindow(1)
    assert spans(window.add("j", 1, MEMBERS, [1, 1, 1])) == [(1, 0, 1)]
    assert spans(window.add("j", 1, MEMBERS, [1, 1, 1])) == [(1, 1, 1)]
    assert window.flush() == []


def test_bad_span_settings_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="positive"):
        StepWindow(0)
    with pytest.raises(ValueError, match="HORDE_REPORT_SPAN='often' must be an integer"):
        WorkerSettings.from_env({"HORDE_REPORT_SPAN": "often"})
    with pytest.raises(ValueError, match="HORDE_REPORT_SPAN=0"):
        WorkerSettings.from_env({"HORDE_REPORT_SPAN": "0"})
    assert WorkerSettings.from_env({"HORDE_REPORT_SPAN": "1"}).report_span == 1


@pytest.mark.parametrize("steps", [1, 15, 16, 17, 50])
def test_every_step_is_credited_exactly_once(client, steps: int) -> None:
    """Three members report through their own windows; the ledger counts every step."""
    tokens = {n: register(client, n) for n in MEMBERS}
    samples = {"a": 8, "b": 16, "c": 32}
    windows = {n: StepWindow(16) for n in MEMBERS}
    sent = {n: [] for n in MEMBERS}
    for _ in range(steps):
        for node in MEMBERS:
            sent[node] += windows[node].add("job1", 7, MEMBERS, [samples[m] for m in MEMBERS])
    for node in MEMBERS:
        sent[node] += windows[node].flush()
        response = post_reports(client, node, tokens[node], sent[node])
        assert response.status_code == 200, response.get_json()
    assert {n: credit_of(client, n) for n in MEMBERS} == {n: steps * s
                                                         for n, s in samples.items()}
    assert client.get("/api/v1/jobs/job1").get_json()["rounds"] == steps
    assert len(sent["a"]) == (steps - 1) // 16 + (steps - 16 * ((steps - 1) // 16))
