"""The leader's membership rules (`rendezvous.policy`) on hand-built cluster views.

Pure function tests: no I/O, no threads, no sleeping. Time is a number we choose.
Also covers the records the rules produce and read (`rendezvous.generation`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Iterable
from dataclasses import replace

import pytest

from rendezvous.generation import BlacklistEntry, Generation, JobStatus, Member, NodeInfo
from rendezvous.policy import (
    Action,
    ClusterView,
    Decision,
    build_generation,
    cooldown_for,
    decide,
    eligible_nodes,
)
from rendezvous.settings import RendezvousSettings

T0 = 1000.0  # leader-monotonic time at which the tests begin
WALL = 1.7e9  # wall-clock "now" of the views (blacklist entries are wall-clock)


def settings(**overrides: object) -> RendezvousSettings:
    base: dict[str, object] = dict(
        job="policy", min_np=2, max_np=4, target_np=3, settle_window=1.0,
        start_timeout=10.0, elastic_timeout=30.0, reset_timeout=5.0,
    )
    base.update(overrides)
    return RendezvousSettings(**base)  # type: ignore[arg-type]


def node(node_id: str, host: str | None = None, order: int = 0,
         registered_at: float = 0.0, slots: int = 1) -> NodeInfo:
    return NodeInfo(node_id=node_id, host=host or f"host-{node_id}", addr=f"addr-{node_id}",
                    store_port=29500, slots=slots, order=order, registered_at=registered_at)


def nodes_of(*infos: NodeInfo) -> dict[str, NodeInfo]:
    return {n.node_id: n for n in infos}


def generation(gen_id: int, ids: Iterable[str]) -> Generation:
    members = tuple(Member(node_id=i, host=f"host-{i}", addr=f"addr-{i}") for i in ids)
    return Generation(id=gen_id, members=members, store_host=members[0].addr, store_port=29500)


def view(gen: Generation | None, infos: Iterable[NodeInfo], seen_at: float = T0,
         **kwargs: object) -> ClusterView:
    """A view where every node was first seen at `seen_at` unless `first_seen` says otherwise."""
    nodes = nodes_of(*infos)
    first_seen = {n: seen_at for n in nodes}
    first_seen.update(kwargs.pop("first_seen", {}))  # type: ignore[arg-type]
    return ClusterView(generation=gen, nodes=nodes, first_seen=first_seen, wall_now=WALL,
                       **kwargs)  # type: ignore[arg-type]


# -- the first generation ---------------------------------------------------------------


def test_first_generation_waits_for_target_np() -> None:
    s = settings()
    d = decide(view(None, [node("a"), node("b")]), s, T0 + 1)
    assert d.action == Action.WAIT
    assert d.wake_at == T0 + s.start_timeout  # nothing to do before the start timeout


def test_no_nodes_at_all_waits_without_deadline() -> None:
    assert decide(view(None, []), settings(), T0) == Decision(Action.WAIT)


def test_first_generation_settles_before_publishing() -> None:
    s = settings()
    v = view(None, [node("a"), node("b"), node("c")],
             first_seen={"a": T0, "b": T0 + 0.2, "c": T0 + 0.5})
    early = decide(v, s, T0 + 0.6)
    assert early.action == Action.WAIT
    assert early.wake_at == pytest.approx(T0 + 0.5 + s.settle_window)
    assert decide(v, s, T0 + 1.4).action == Action.WAIT
    done = decide(v, s, T0 + 1.5)
    assert done.action == Action.PUBLISH
    assert done.members == ("a", "b", "c")
    assert done.reason == "job started"


def test_first_generation_ranks_follow_order_then_registration() -> None:
    infos = [
        node("zed", order=0, registered_at=5.0),
        node("amy", order=2, registered_at=1.0),
        node("bob", order=1, registered_at=9.0),
        node("cat", order=0, registered_at=3.0),  # same order as zed, registered earlier
    ]
    # The leader saw them in another order again: that must not matter for generation 0.
    v = view(None, infos, first_seen={"amy": T0, "bob": T0 + 0.1, "zed": T0 + 0.2,
                                      "cat": T0 + 0.3})
    d = decide(v, settings(max_np=4, target_np=4), T0 + 5)
    assert d.action == Action.PUBLISH
    assert d.members == ("cat", "zed", "bob", "amy")


def test_first_generation_same_order_and_time_ties_on_node_id() -> None:
    v = view(None, [node("n2"), node("n1"), node("n3")])
    d = decide(v, settings(), T0 + 5)
    assert d.members == ("n1", "n2", "n3")


def test_first_generation_at_max_np_publishes_without_settling() -> None:
    infos = [node(f"n{i}", order=i) for i in range(6)]
    d = decide(view(None, infos), settings(max_np=4), T0)  # all seen just now
    assert d.action == Action.PUBLISH
    assert d.members == ("n0", "n1", "n2", "n3")


def test_start_timeout_elastic_starts_with_at_least_min_np() -> None:
    s = settings(min_np=2, target_np=3, max_np=4)
    v = view(None, [node("a"), node("b")])
    assert decide(v, s, T0 + s.start_timeout - 0.01).action == Action.WAIT
    d = decide(v, s, T0 + s.start_timeout)
    assert d.action == Action.PUBLISH
    assert d.members == ("a", "b")
    assert "start timeout" in d.reason


def test_start_timeout_elastic_below_min_np_fails() -> None:
    s = settings(min_np=2, target_np=3, max_np=4)
    d = decide(view(None, [node("a")]), s, T0 + s.start_timeout)
    assert d.action == Action.FAIL
    assert "only 1 of the 3 requested workers" in d.reason


def test_start_timeout_non_elastic_fails_naming_the_counts() -> None:
    s = settings(min_np=3, target_np=3, max_np=3, start_timeout=7.0)
    assert not s.elastic
    v = view(None, [node("a"), node("b")])
    assert decide(v, s, T0 + 6.99).action == Action.WAIT
    d = decide(v, s, T0 + 7.0)
    assert d.action == Action.FAIL
    assert "only 2 of the 3 requested workers" in d.reason
    assert "start timeout of 7 s" in d.reason
    assert "--start-timeout" in d.reason


def test_start_timeout_counts_from_the_first_node_seen() -> None:
    s = settings(min_np=2, target_np=3)
    v = view(None, [node("a"), node("b")], first_seen={"a": T0, "b": T0 + 8})
    assert decide(v, s, T0 + 9).wake_at == T0 + s.start_timeout


# -- lost members ---------------------------------------------------------------------


def test_lost_member_publishes_survivors_at_once_in_relative_order() -> None:
    gen = generation(4, ["d", "a", "c", "b"])
    v = view(gen, [node("a"), node("b"), node("d")])  # c's lease expired
    d = decide(v, settings(), T0)
    assert d.action == Action.PUBLISH
    assert d.members == ("d", "a", "b")
    assert "lost c" in d.reason


def test_lost_member_appends_newcomers_without_settling() -> None:
    gen = generation(1, ["a", "b", "c"])
    infos = [node("a"), node("c"), node("y"), node("x")]
    # x came before y; both arrived "just now", so there was no settle window yet.
    v = view(gen, infos, first_seen={"x": T0 + 0.9, "y": T0 + 1.0})
    d = decide(v, settings(), T0 + 1.0)
    assert d.action == Action.PUBLISH
    assert d.members == ("a", "c", "x", "y")
    assert "lost b" in d.reason and "admitted x, y" in d.reason


def test_lost_member_newcomers_capped_by_max_np() -> None:
    gen = generation(1, ["a", "b", "c", "d"])
    infos = [node(i) for i in "abcxyz"]
    v = view(gen, infos, first_seen={"x": T0 + 1, "y": T0 + 2, "z": T0 + 3})
    d = decide(v, settings(max_np=4), T0 + 3)
    assert d.members == ("a", "b", "c", "x")


def test_member_that_announced_leaving_is_dropped_before_its_lease_ends() -> None:
    gen = generation(0, ["a", "b", "c"])
    v = view(gen, [node("a"), node("b"), node("c")], leaving={"b": "left"})
    d = decide(v, settings(), T0)
    assert d.action == Action.PUBLISH
    assert d.members == ("a", "c")


def test_stable_generation_waits() -> None:
    gen = generation(0, ["a", "b", "c"])
    assert decide(view(gen, [node(i) for i in "abc"]), settings(), T0) == Decision(Action.WAIT)


# -- joins and the settle window ------------------------------------------------------


def test_newcomers_wait_at_max_np() -> None:
    gen = generation(0, ["a", "b", "c", "d"])
    d = decide(view(gen, [node(i) for i in "abcde"]), settings(max_np=4), T0 + 100)
    assert d == Decision(Action.WAIT)


def test_newcomers_fill_only_up_to_max_np() -> None:
    gen = generation(0, ["a", "b", "c"])
    v = view(gen, [node(i) for i in "abcxy"], first_seen={"x": T0, "y": T0 + 0.1})
    d = decide(v, settings(max_np=4), T0 + 5)
    assert d.action == Action.PUBLISH
    assert d.members == ("a", "b", "c", "x")


def _simulate(s: RendezvousSettings, arrivals: dict[str, float], until: float,
              step: float = 0.01, batch: tuple[str, int] | None = None
              ) -> list[tuple[float, tuple[str, ...]]]:
    """Run the leader loop on a time line: nodes appear at `arrivals` (all of launch
    batch `batch` = (id, size) when given); returns publishes."""
    gen = generation(0, ["a", "b"])
    infos = {"a": node("a"), "b": node("b")}
    first_seen = {"a": T0 - 100, "b": T0 - 100}
    published: list[tuple[float, tuple[str, ...]]] = []
    for tick in range(int(round((until - T0) / step)) + 1):
        now = T0 + tick * step
        for node_id, at in arrivals.items():
            if at <= now and node_id not in infos:
                infos[node_id] = node(node_id) if batch is None else replace(
                    node(node_id), batch=batch[0], batch_size=batch[1])
                first_seen[node_id] = now
        v = ClusterView(generation=gen, nodes=dict(infos), first_seen=dict(first_seen),
                        wall_now=WALL)
        d = decide(v, s, now)
        if d.action == Action.PUBLISH:
            published.append((now, d.members))
            gen = generation(gen.id + 1, d.members)
        else:
            assert d.action == Action.WAIT
            assert d.wake_at is None or d.wake_at > now  # never a busy loop
    return published


def test_joins_within_the_settle_window_cost_one_generation() -> None:
    s = settings(max_np=8, settle_window=1.0, admission_window=5.0)
    arrivals = {"c": T0 + 0.10, "d": T0 + 0.35, "e": T0 + 0.60, "f": T0 + 0.90, "g": T0 + 1.2}
    published = _simulate(s, arrivals, until=T0 + 10)
    assert len(published) == 1
    at, members = published[0]
    assert members == ("a", "b", "c", "d", "e", "f", "g")
    assert at == pytest.approx(T0 + 1.2 + s.settle_window)


def test_join_after_a_quiet_settle_window_is_a_second_generation() -> None:
    s = settings(max_np=8, settle_window=1.0)
    published = _simulate(s, {"c": T0 + 0.1, "d": T0 + 3.0}, until=T0 + 6)
    assert [m for _, m in published] == [("a", "b", "c"), ("a", "b", "c", "d")]


def test_a_launch_batch_slower_than_the_settle_window_is_admitted_at_once() -> None:
    s = settings(max_np=8, settle_window=0.3)
    arrivals = {"c": T0 + 0.1, "d": T0 + 1.5, "e": T0 + 2.9}  # 1.4 s apart: > a window
    assert [m for _, m in _simulate(s, arrivals, until=T0 + 6)] == [
        ("a", "b", "c"), ("a", "b", "c", "d"), ("a", "b", "c", "d", "e")]
    published = _simulate(s, arrivals, until=T0 + 6, batch=("x1", 3))
    assert [m for _, m in published] == [("a", "b", "c", "d", "e")]
    assert T0 + 2.9 <= published[0][0] <= T0 + 2.9 + s.settle_window + 0.01


def test_an_incomplete_launch_batch_is_admitted_after_the_start_timeout() -> None:
    s = settings(max_np=8, settle_window=0.3, start_timeout=5.0)
    published = _simulate(s, {"c": T0 + 0.1, "d": T0 + 0.2}, until=T0 + 8,
                          batch=("x1", 3))  # the third worker never registers
    assert published == [(pytest.approx(T0 + 0.1 + 5.0), ("a", "b", "c", "d"))]


def test_steady_trickle_of_joins_is_capped_by_the_admission_window() -> None:
    s = settings(max_np=100, settle_window=1.0, admission_window=3.0)
    arrivals = {f"j{i:02d}": T0 + 0.5 * i for i in range(40)}  # one every half window
    published = _simulate(s, arrivals, until=T0 + 12, step=0.05)
    assert published, "a steady trickle must not starve admission"
    at, members = published[0]
    assert at == pytest.approx(T0 + s.admission_window)
    expected = ("a", "b") + tuple(f"j{i:02d}" for i in range(7))  # arrived by T0 + 3
    assert members == expected
    # the next batch starts with the first join left out, and waits at most as long
    at2, members2 = published[1]
    assert at2 == pytest.approx(T0 + 3.5 + s.admission_window)
    assert members2[:len(members)] == members and members2[len(members)] == "j07"


def test_the_default_admission_window_bounds_a_join_to_2_s() -> None:
    s = settings(max_np=100, settle_window=0.5)
    arrivals = {f"j{i:02d}": T0 + 0.25 * i for i in range(40)}
    published = _simulate(s, arrivals, until=T0 + 12, step=0.05)
    waits = []
    for node_id, arrived in arrivals.items():
        at = next(t for t, members in published if node_id in members)
        waits.append(at - arrived)
    assert max(waits) <= s.admission_window + 0.05 + 1e-9
    assert s.admission_window == 2.0


def test_the_admission_window_is_never_shorter_than_the_settle_window() -> None:
    s = settings(max_np=8, settle_window=1.5, admission_window=0.5)
    published = _simulate(s, {"c": T0 + 0.1, "d": T0 + 1.0}, until=T0 + 6)
    assert published == [(pytest.approx(T0 + 0.1 + 1.5), ("a", "b", "c", "d"))]


def test_settle_wake_up_time_is_reported() -> None:
    gen = generation(0, ["a", "b"])
    v = view(gen, [node(i) for i in "abc"], first_seen={"c": T0})
    d = decide(v, settings(settle_window=0.25), T0 + 0.1)
    assert d.action == Action.WAIT and d.wake_at == pytest.approx(T0 + 0.25)


# -- reset requests (ready markers) ----------------------------------------------------


def test_ready_markers_wait_for_every_live_member() -> None:
    s = settings(reset_timeout=5.0)
    gen = generation(3, ["a", "b", "c"])
    v = view(gen, [node(i) for i in "abc"], ready={"a", "b"}, ready_since=T0)
    d = decide(v, s, T0 + 2)
    assert d.action == Action.WAIT
    assert d.wake_at == T0 + 5.0
    assert d.blacklist == ()


def test_all_live_members_ready_publishes_the_same_members() -> None:
    gen = generation(3, ["c", "a", "b"])
    v = view(gen, [node(i) for i in "abc"], ready={"a", "b", "c"}, ready_since=T0)
    d = decide(v, settings(), T0 + 0.1)
    assert d.action == Action.PUBLISH
    assert d.members == ("c", "a", "b")
    assert d.reason == "collective failure reported"
    assert d.blacklist == ()


def test_ready_markers_then_reset_timeout_drops_and_blacklists_the_unresponsive() -> None:
    s = settings(reset_timeout=5.0, min_np=2)
    gen = generation(3, ["a", "b", "c", "d"])
    v = view(gen, [node(i) for i in "abcd"], ready={"a", "c"}, ready_since=T0)
    d = decide(v, s, T0 + 5.0)
    assert d.action == Action.PUBLISH
    assert d.members == ("a", "c")
    assert d.blacklist == ("b", "d")
    assert "unresponsive b, d" in d.reason


def test_ready_since_defaults_to_now() -> None:
    gen = generation(0, ["a", "b"])
    v = view(gen, [node("a"), node("b")], ready={"a"})
    assert decide(v, settings(reset_timeout=3.0), T0).wake_at == T0 + 3.0


def test_ready_markers_of_non_members_are_ignored() -> None:
    gen = generation(0, ["a", "b"])
    v = view(gen, [node(i) for i in "abx"], ready={"x"}, first_seen={"x": T0})
    d = decide(v, settings(), T0 + 0.1)
    assert d.action == Action.WAIT and d.blacklist == ()


def test_ready_with_a_death_publishes_at_once() -> None:
    gen = generation(0, ["a", "b", "c"])
    v = view(gen, [node("a"), node("b")], ready={"a"}, ready_since=T0)
    d = decide(v, settings(), T0 + 0.1)
    assert d.action == Action.PUBLISH
    assert d.members == ("a", "b")
    assert d.blacklist == ()


def test_unresponsive_drop_below_min_np_starves_and_still_blacklists() -> None:
    s = settings(min_np=2, reset_timeout=1.0)
    gen = generation(0, ["a", "b"])
    v = view(gen, [node("a"), node("b")], ready={"a"}, ready_since=T0)
    d = decide(v, s, T0 + 1.0)
    assert d.action == Action.WAIT and d.starving
    assert d.blacklist == ("b",)


# -- the blacklist --------------------------------------------------------------------


def entry(node_id: str, until: float) -> BlacklistEntry:
    return BlacklistEntry(node_id=node_id, reason="test", until=until)


def test_blacklisted_node_id_is_excluded_while_active() -> None:
    gen = generation(0, ["a", "b", "c"])
    v = view(gen, [node(i) for i in "abc"], blacklist={"b": entry("b", WALL + 10)})
    d = decide(v, settings(), T0)
    assert d.action == Action.PUBLISH
    assert d.members == ("a", "c")
    assert "lost b" in d.reason


def test_blacklisted_host_excludes_every_node_on_it() -> None:
    infos = [node("a", host="h1"), node("b", host="bad"), node("c", host="bad"),
             node("d", host="h2")]
    v = view(None, infos, blacklist={"bad": entry("bad", math.inf)})
    assert [n.node_id for n in eligible_nodes(v)] == ["a", "d"]
    d = decide(v, settings(min_np=2, target_np=2), T0 + 5)
    assert d.members == ("a", "d")


def test_blacklisted_node_is_eligible_again_after_until() -> None:
    gen = generation(1, ["a", "c"])
    infos = [node(i) for i in "abc"]
    blacklist = {"b": entry("b", WALL + 1.0)}
    active = view(gen, infos, blacklist=blacklist, first_seen={"b": T0})
    assert decide(active, settings(), T0 + 5) == Decision(Action.WAIT)
    expired = dataclasses.replace(active, wall_now=WALL + 1.0)  # `until` is exclusive
    d = decide(expired, settings(), T0 + 5)
    assert d.action == Action.PUBLISH
    assert d.members == ("a", "c", "b")


def test_blacklisted_node_is_kept_out_of_the_first_generation() -> None:
    v = view(None, [node(i) for i in "abc"], blacklist={"a": entry("a", math.inf)})
    d = decide(v, settings(min_np=2, target_np=2), T0 + 5)
    assert d.members == ("b", "c")


# -- below min_np ---------------------------------------------------------------------


def test_below_min_np_waits_starving_until_elastic_timeout() -> None:
    s = settings(min_np=2, elastic_timeout=30.0)
    gen = generation(2, ["a", "b"])
    v = view(gen, [node("a")])
    d = decide(v, s, T0)
    assert d.action == Action.WAIT
    assert d.starving is True
    assert d.wake_at == T0 + 30.0
    later = dataclasses.replace(v, starving_since=T0)
    assert decide(later, s, T0 + 29.9).action == Action.WAIT


def test_below_min_np_fails_after_elastic_timeout_with_a_clear_message() -> None:
    s = settings(min_np=3, max_np=4, target_np=3, elastic_timeout=12.0)
    gen = generation(2, ["a", "b", "c"])
    v = view(gen, [node("a"), node("b")], starving_since=T0)
    d = decide(v, s, T0 + 12.0)
    assert d.action == Action.FAIL
    assert "2 worker(s), fewer than min_np=3" in d.reason
    assert "elastic timeout of 12 s" in d.reason
    assert d.starving is False


def test_newcomer_rescues_a_starving_job() -> None:
    s = settings(min_np=2)
    gen = generation(2, ["a", "b"])
    v = view(gen, [node("a"), node("x")], starving_since=T0, first_seen={"x": T0 + 3})
    d = decide(v, s, T0 + 3)
    assert d.action == Action.PUBLISH
    assert d.members == ("a", "x")


# -- finishing ------------------------------------------------------------------------


def test_member_that_finished_finishes_the_job() -> None:
    gen = generation(0, ["a", "b"])
    d = decide(view(gen, [node("b")], leaving={"a": "finished"}), settings(), T0)
    assert d.action == Action.FINISH
    assert "finished" in d.reason


def test_non_member_that_finished_does_not_finish_the_job() -> None:
    gen = generation(0, ["a", "b"])
    v = view(gen, [node("a"), node("b")], leaving={"z": "finished"})
    assert decide(v, settings(), T0).action == Action.WAIT


def test_finished_before_any_generation_does_not_finish() -> None:
    v = view(None, [node("a")], leaving={"b": "finished"})
    assert decide(v, settings(), T0).action == Action.WAIT


# -- cooldowns --------------------------------------------------------------------------


def test_cooldown_is_permanent_by_default() -> None:
    assert cooldown_for(1, None, 0.0) == math.inf
    assert cooldown_for(7, None, 0.9) == math.inf


def test_cooldown_doubles_from_low_and_is_capped_at_high() -> None:
    cooldown = (10.0, 100.0)
    assert [cooldown_for(c, cooldown, 0.0) for c in (1, 2, 3, 4, 5, 6)] == [
        10.0, 20.0, 40.0, 80.0, 100.0, 100.0]
    assert cooldown_for(0, cooldown, 0.0) == 10.0


def test_cooldown_jitter_spreads_but_stays_under_the_cap() -> None:
    assert cooldown_for(1, (10.0, 100.0), 0.5) == 15.0
    assert cooldown_for(4, (10.0, 100.0), 0.99) == 89.9
    assert cooldown_for(5, (10.0, 100.0), 0.99) == 100.0


def test_cooldown_after_very_many_evictions_is_the_cap() -> None:
    assert cooldown_for(5000, (1.0, 60.0), 0.5) == 60.0
    assert cooldown_for(5000, (0.0, 0.0), 0.0) == 0.0


# -- building generations ----------------------------------------------------------------


def test_build_generation_numbers_and_places_the_store_on_rank_zero() -> None:
    infos = nodes_of(node("a", slots=2), node("b"))
    infos["b"] = dataclasses.replace(infos["b"], store_port=31000)
    first = build_generation(None, ("b", "a"), infos, "job started", WALL)
    assert first.id == 0
    assert first.node_ids == ["b", "a"]
    assert (first.store_host, first.store_port) == ("addr-b", 31000)
    assert first.members[1] == Member(node_id="a", host="host-a", addr="addr-a", slots=2)
    second = build_generation(first, ("a",), infos, "lost b", WALL + 1)
    assert (second.id, second.reason, second.created_at) == (1, "lost b", WALL + 1)
    assert second.rank_of("a") == 0 and second.rank_of("b") is None


# -- Generation.local_layout --------------------------------------------------------------


def layout_generation(hosts: list[str]) -> Generation:
    members = tuple(Member(node_id=f"r{rank}", host=h, addr=h) for rank, h in enumerate(hosts))
    return Generation(id=0, members=members, store_host=hosts[0], store_port=1)


def test_local_layout_two_hosts_two_slots() -> None:
    gen = layout_generation(["A", "A", "B", "B"])
    assert [gen.local_layout(f"r{r}") for r in range(4)] == [
        (0, 2, 0, 2), (1, 2, 0, 2), (0, 2, 1, 2), (1, 2, 1, 2)]


def test_local_layout_interleaved_hosts_follow_rank_order() -> None:
    gen = layout_generation(["A", "B", "A", "B"])
    assert [gen.local_layout(f"r{r}") for r in range(4)] == [
        (0, 2, 0, 2), (0, 2, 1, 2), (1, 2, 0, 2), (1, 2, 1, 2)]


def test_local_layout_uneven_hosts() -> None:
    gen = layout_generation(["A", "A", "A", "B", "C", "C"])
    assert [gen.local_layout(f"r{r}") for r in range(6)] == [
        (0, 3, 0, 3),  # local rank 0 exists on A, B and C
        (1, 3, 0, 2),  # local rank 1 only on A and C
        (2, 3, 0, 1),  # local rank 2 only on A
        (0, 1, 1, 3),
        (0, 2, 2, 3),
        (1, 2, 1, 2),
    ]


def test_local_layout_single_node() -> None:
    assert layout_generation(["A"]).local_layout("r0") == (0, 1, 0, 1)


# -- JSON round trips -----------------------------------------------------------------


def test_node_info_round_trip() -> None:
    info = NodeInfo(node_id="n-é", host="h", addr="10.0.0.1", store_port=29500, slots=4,
                    pid=123, lease=0x7A, registered_at=1.5, order=3,
                    hardware={"gpu": "RTX 3090", "memory_gb": 24})
    assert NodeInfo.from_json(info.to_json()) == info


def test_node_info_ignores_unknown_fields() -> None:
    data = b'{"node_id": "n", "host": "h", "addr": "a", "store_port": 1, "future": true}'
    assert NodeInfo.from_json(data) == NodeInfo(node_id="n", host="h", addr="a", store_port=1)


def test_generation_round_trip() -> None:
    gen = Generation(id=7, members=(Member("a", "h1", "10.0.0.1", 2), Member("b", "h2", "x")),
                     store_host="10.0.0.1", store_port=29511, reason="lost c", created_at=3.25)
    again = Generation.from_json(gen.to_json())
    assert again == gen
    assert isinstance(again.members, tuple)
    assert again.local_layout("b") == gen.local_layout("b")


@pytest.mark.parametrize("until", [WALL + 12.5, math.inf])
def test_blacklist_entry_round_trip(until: float) -> None:
    record = BlacklistEntry(node_id="n", reason="strikes", until=until, count=3)
    data = record.to_json()
    assert b"Infinity" not in data  # strict JSON, readable by etcdctl users and other tools
    assert BlacklistEntry.from_json(data) == record


def test_blacklist_entry_active_until_exclusive() -> None:
    record = entry("n", WALL)
    assert record.active(WALL - 0.001) and not record.active(WALL)


def test_job_status_round_trip() -> None:
    status = JobStatus("failed", "the job had 1 worker(s)")
    assert JobStatus.from_json(status.to_json()) == status


def test_member_back_under_a_new_lease_is_dropped_and_readmitted_last() -> None:
    # Its registration died (lease revoked or expired) and it registered again before
    # the leader looked: the generation must change, or it would wait for admission forever.
    infos = [replace(node(n), lease=lease) for n, lease in (("a", 1), ("b", 2), ("c", 3))]
    gen = build_generation(None, ("a", "b", "c"), nodes_of(*infos), "job started", WALL)
    back = [infos[0], replace(infos[1], lease=22), infos[2]]
    d = decide(view(gen, back), settings(max_np=4), T0)
    assert d.action == Action.PUBLISH
    assert d.members == ("a", "c", "b")
    unchanged = decide(view(gen, infos), settings(max_np=4), T0)
    assert unchanged.action == Action.WAIT


def test_the_admission_window_comes_from_the_flag_or_horde_admission_window(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from elastic.launcher.cli import UsageError, build_plan, make_parser

    def plan(*flags: str) -> RendezvousSettings:
        args = make_parser().parse_args([*flags, "-np", "2", sys.executable, __file__])
        return build_plan(args).rdzv

    monkeypatch.delenv("HORDE_ADMISSION_WINDOW", raising=False)
    assert plan().admission_window == 2.0
    monkeypatch.setenv("HORDE_ADMISSION_WINDOW", "3.5")
    assert plan().admission_window == 3.5
    assert plan("--admission-window", "1").admission_window == 1.0
    assert plan().to_env()["HORDE_ADMISSION_WINDOW"] == "3.5"  # what workers and --join read
    with pytest.raises(UsageError, match="admission_window=-1.0 must not be negative"):
        plan("--admission-window", "-1")


# -- trusted members rank first ----------------------------------------------------------


def test_trusted_nodes_rank_first_in_the_first_generation() -> None:
    """The owner's worker registered after two volunteers: it still gets rank 0, whose
    parameters the first broadcast sends to everyone."""
    infos = [node("vol-a", order=0), node("vol-b", order=1), node("owner-0", order=2)]
    d = decide(view(None, infos, trusted={"owner-0"}), settings(), T0 + 2.0)
    assert d.action == Action.PUBLISH and d.members == ("owner-0", "vol-a", "vol-b")
    plain = decide(view(None, infos), settings(), T0 + 2.0)
    assert plain.members == ("vol-a", "vol-b", "owner-0")


def test_trusted_survivors_rank_first_and_newcomers_last_even_if_trusted() -> None:
    """After a loss the trusted survivor moves to rank 0 (every survivor holds the same
    state, so it may broadcast it); a trusted newcomer holds none and goes last."""
    gen = generation(3, ["vol-a", "vol-b", "owner-0", "gone"])
    infos = [node("vol-a"), node("vol-b"), node("owner-0"), node("owner-1")]
    d = decide(view(gen, infos, trusted={"owner-0", "owner-1"},
                    first_seen={"owner-1": T0 - 5.0}), settings(), T0 + 2.0)
    assert d.action == Action.PUBLISH, d
    assert d.members == ("owner-0", "vol-a", "vol-b", "owner-1"), d
    # admissions alone re-rank the holders of the state the same way
    gen = generation(4, ["vol-a", "owner-0"])
    infos = [node("vol-a"), node("owner-0"), node("vol-c")]
    d = decide(view(gen, infos, trusted={"owner-0"}, first_seen={"vol-c": T0 - 5.0}),
               settings(), T0 + 2.0)
    assert d.members == ("owner-0", "vol-a", "vol-c"), d
