"""The volunteer-scale benchmark: its history checks catch a double admission and a lost
generation, and a short real run (etcd, coordinator, churning volunteers) finds neither."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.volunteer_scale import check_history
from rendezvous.generation import Generation, Member
from tests.harness import REPO, repo_env


def gen(gen_id: int, *members: tuple[str, int]) -> Generation:
    return Generation(id=gen_id, members=tuple(Member(n, n, "127.0.0.1", lease=lease)
                                               for n, lease in members),
                      store_host="127.0.0.1", store_port=1)


def test_a_clean_history_has_nothing_to_report() -> None:
    history = [gen(0, ("a", 1)), gen(1, ("a", 1), ("b", 2)), gen(2, ("a", 1)),
               gen(3, ("a", 1), ("b", 3))]  # b left and came back under a new lease
    checked = check_history(history)
    assert (checked["lost"], checked["twice"], checked["admissions"]) == (0, 0, 3)


def test_one_registration_admitted_twice_and_a_gap_are_counted() -> None:
    history = [gen(0, ("a", 1)), gen(1, ("a", 1), ("b", 2)), gen(2, ("a", 1)),
               gen(4, ("a", 1), ("b", 2)),  # b's same lease again; generation 3 missing
               gen(5, ("a", 1), ("a", 1))]  # a listed twice
    checked = check_history(history)
    assert checked["lost"] == 1
    assert checked["twice"] == 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_short_run_admits_everyone_once_and_loses_no_generation() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/volunteer_scale.py", "--volunteers", "8", "--duration",
         "12", "--stay-min", "2", "--stay-max", "4", "--away-min", "0.5", "--away-max", "2",
         "--ramp", "2", "--vanish", "0.5"],
        cwd=REPO, env=repo_env(), capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert value(out, "nodes admitted twice (must be 0)") == "0", out
    assert value(out, "generations lost (must be 0)") == "0", out
    assert value(out, "joins not admitted within 60 s") == "0", out
    assert int(value(out, "generations formed").split()[0]) >= 3, out  # churn happened
    assert "note:" not in out, out


def value(table: str, measure: str) -> str:
    """The value column of the benchmark table's row for `measure`."""
    for line in table.splitlines():
        if f"  {measure}  " in line:
            return line.split(f"  {measure}  ", 1)[1].strip()
    raise AssertionError(f"no row {measure!r} in:\n{table}")
