"""Per-generation topology: the leader sends a generation through the relay exactly when
a member accepts no inbound connection (or relay_mode is "always"), and the records
that carry it (`reachable`, `relay`) are validated like the others."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rendezvous.generation import Generation, NodeInfo
from rendezvous.policy import build_generation
from rendezvous.records import InvalidRecordError
from rendezvous.settings import RendezvousSettings

WALL = 1.7e9
RELAY = RendezvousSettings(relay="203.0.113.5:4000", relay_store_port=4001)


def infos(*reachable: bool) -> dict[str, NodeInfo]:
    return {f"n{i}": NodeInfo(node_id=f"n{i}", host=f"h{i}", addr=f"10.0.0.{i + 1}",
                              store_port=30000 + i, reachable=r)
            for i, r in enumerate(reachable)}


def test_all_reachable_is_direct_gloo_on_the_owners_store() -> None:
    """Direct Gloo, but the store (which tells members where to connect) is the job
    owner's, never a volunteer's that happens to be rank 0; without one, rank 0's."""
    gen = build_generation(None, ("n0", "n1"), infos(True, True), "job started", WALL, RELAY)
    assert gen.relay == ""
    assert (gen.store_host, gen.store_port) == ("203.0.113.5", 4001)
    gen = build_generation(None, ("n0", "n1"), infos(True, True), "job started", WALL,
                           RendezvousSettings())
    assert (gen.store_host, gen.store_port) == ("10.0.0.1", 30000)


def test_an_unreachable_member_sends_the_generation_through_the_relay() -> None:
    gen = build_generation(None, ("n0", "n1", "n2"), infos(True, False, False), "joined",
                           WALL, RELAY)
    assert gen.relay == "203.0.113.5:4000"
    assert (gen.store_host, gen.store_port) == ("203.0.113.5", 4001)
    assert "2 member(s) accept no inbound connections" in gen.reason
    assert [m.reachable for m in gen.members] == [True, False, False]
    assert Generation.from_json(gen.to_json()) == gen  # the record round-trips


def test_without_a_relay_or_with_never_it_stays_direct() -> None:
    nodes = infos(True, False)
    for settings in (None, RendezvousSettings(),
                     dataclasses.replace(RELAY, relay_mode="never")):
        assert build_generation(None, ("n0", "n1"), nodes, "x", WALL, settings).relay == ""


def test_always_uses_the_relay_but_not_for_a_world_of_one() -> None:
    always = dataclasses.replace(RELAY, relay_mode="always")
    assert build_generation(None, ("n0", "n1"), infos(True, True), "x", WALL,
                            always).relay == RELAY.relay
    assert build_generation(None, ("n0",), infos(False), "x", WALL, always).relay == ""


@pytest.mark.parametrize("relay", ["nohost", "h:port", "a b:1", "h:123456", 5])
def test_a_bad_relay_in_a_generation_is_refused(relay: object) -> None:
    gen = json.loads(build_generation(None, ("n0",), infos(True), "x", WALL).to_json())
    gen["relay"] = relay
    with pytest.raises(InvalidRecordError, match="relay"):
        Generation.from_json(json.dumps(gen).encode())


def test_reachable_must_be_a_boolean() -> None:
    info = json.loads(infos(True)["n0"].to_json())
    info["reachable"] = "yes"
    with pytest.raises(InvalidRecordError, match="reachable"):
        NodeInfo.from_json(json.dumps(info).encode())
    info.pop("reachable")  # a registration of an older version: reachable, as before
    assert NodeInfo.from_json(json.dumps(info).encode()).reachable is True


@pytest.mark.parametrize("kwargs, problem", [
    ({"relay_mode": "sometimes"}, "relay_mode"),
    ({"relay": "host"}, "HOST:PORT"),
    ({"relay": "host:1"}, "relay_store_port"),
])
def test_bad_relay_settings_are_refused(kwargs: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        RendezvousSettings(**kwargs)
