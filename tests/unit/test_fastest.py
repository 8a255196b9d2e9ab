"""fastest.py without a kernel: what is raced, and what the learned maps hold as links come and go.

The race itself and the NFLOG reports run against the kernel in
tests/integration/test_fastest_response.py.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Coroutine
from typing import Any

import pytest
from uplinkd import planner
from uplinkd.backends.base import ApplyKind, Learned
from uplinkd.backends.fake import FakeBackend
from uplinkd.fastest import MAX_RACES, Entry, FastestResponse, LearnedDestination, RaceResult
from uplinkd.model import Match, Method, Rule
from uplinkd.nflog import LoggedPacket, NflogError, NflogListener
from uplinkd.plan import Plan

from .test_planner import config, facts

IP = ipaddress.IPv4Address
A, B, C = IP("203.0.113.20"), IP("203.0.113.30"), IP("203.0.113.40")
WEB = "rule_0_web"


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def plan(up: set[str], method: Method = Method.FASTEST_RESPONSE) -> Plan:
    web = Rule("web", method, Match(proto="tcp"), cache_seconds=120)
    cfg = config({"ISP1": 1, "ISP2": 1, "ISP3": 1}, rules=(web,))
    return planner.plan(cfg, facts("ISP1", "ISP2", "ISP3"), up)


def component() -> tuple[FastestResponse, FakeBackend, Clock, list[Coroutine[Any, Any, None]]]:
    backend, clock, spawned = FakeBackend(), Clock(), list[Coroutine[Any, Any, None]]()
    fastest = FastestResponse(backend, spawned.append, clock=clock)
    fastest.listener = object()  # type: ignore[assignment]  # as if NFLOG were bound
    return fastest, backend, clock, spawned


def packet(dst: ipaddress.IPv4Address, name: str = WEB, dport: int | None = 443) -> LoggedPacket:
    return LoggedPacket("uplinkd-fr " + name, 6, IP("192.168.10.2"), dst, dport, 0)


def test_the_winner_is_the_first_answer() -> None:
    assert RaceResult({"ISP1": 0.150, "ISP2": 0.012}).winner == "ISP2"
    assert RaceResult({}).winner is None


def test_each_new_destination_of_a_rule_is_raced_once_at_a_time() -> None:
    fastest, _, _, spawned = component()
    fastest.on_apply(plan({"ISP1", "ISP2"}), ApplyKind.FULL)
    fastest.on_packet(packet(A))
    fastest.on_packet(packet(A))  # already racing
    fastest.on_packet(packet(B))
    fastest.on_packet(packet(C, name="rule_default"))  # not a fastest-response rule
    fastest.on_packet(packet(C, name="rule_9_gone"))
    fastest.on_packet(packet(C, dport=None))
    assert fastest.racing == {(WEB, A), (WEB, B)}
    assert len(spawned) == 2
    for coroutine in spawned:
        coroutine.close()


def test_races_at_once_are_bounded() -> None:
    fastest, _, _, spawned = component()
    fastest.on_apply(plan({"ISP1", "ISP2"}), ApplyKind.FULL)
    for i in range(MAX_RACES + 10):
        fastest.on_packet(packet(IP("198.51.100.0") + i))
    assert len(spawned) == len(fastest.racing) == MAX_RACES
    for coroutine in spawned:
        coroutine.close()


def test_learned_destinations_follow_the_links_in_use_and_expire() -> None:
    fastest, backend, clock, _ = component()
    first = plan({"ISP1", "ISP2", "ISP3"})
    fastest.on_apply(first, ApplyKind.FULL)
    assert backend.learned == {WEB: {}}
    fastest.learned[WEB] = {
        A: Entry("ISP1", clock.now + 100),
        B: Entry("ISP2", clock.now + 100),
        C: Entry("ISP3", clock.now + 5),
    }
    clock.now += 10  # C has expired
    fastest.on_apply(plan({"ISP1", "ISP3"}), ApplyKind.MAPS)  # ISP2 went down
    assert backend.learned == {WEB: {A: Learned(1, 90.0)}}
    assert set(fastest.learned[WEB]) == {A}
    fastest.on_apply(plan({"ISP1", "ISP3"}), ApplyKind.NONE)  # nothing changed: no rewrite
    backend.learned.clear()
    fastest.on_apply(plan({"ISP1", "ISP3"}), ApplyKind.NONE)
    assert backend.learned == {}
    fastest.on_apply(plan({"ISP1", "ISP3"}), ApplyKind.FULL)  # a rebuilt table gets them back
    assert backend.learned == {WEB: {A: Learned(1, 90.0)}}


def test_a_rule_that_stops_being_fastest_response_forgets_and_stops_listening() -> None:
    fastest, _, clock, _ = component()
    fastest.on_apply(plan({"ISP1", "ISP2"}), ApplyKind.FULL)
    fastest.learned[WEB] = {A: Entry("ISP1", clock.now + 100)}
    fastest.listener = None  # nothing to close in this test
    fastest.on_apply(plan({"ISP1", "ISP2"}, Method.WEIGHTED), ApplyKind.FULL)
    assert fastest.learned == {}
    assert fastest.listener is None


def test_a_taken_nflog_group_leaves_the_rule_on_its_weights(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def taken(self: NflogListener) -> None:
        raise NflogError("cannot bind NFLOG group 21301: Operation not permitted")

    monkeypatch.setattr(NflogListener, "open", taken)
    backend, spawned = FakeBackend(), list[Coroutine[Any, Any, None]]()
    fastest = FastestResponse(backend, spawned.append)
    fastest.on_apply(plan({"ISP1", "ISP2"}), ApplyKind.FULL)
    assert fastest.listener is None and spawned == []
    assert "fastest-response cannot hear of new destinations" in caplog.text
    assert "use their weighted fallback" in caplog.text
    assert backend.learned == {WEB: {}}  # the learned map is still kept in step


def test_destinations_list_what_is_still_learned_by_rule_name() -> None:
    fastest, _, clock, _ = component()
    fastest.on_apply(plan({"ISP1", "ISP2"}), ApplyKind.FULL)
    fastest.learned[WEB] = {
        B: Entry("ISP2", clock.now + 30.2),
        A: Entry("ISP1", clock.now + 100),
        C: Entry("ISP1", clock.now - 1),  # expired: the kernel has forgotten it
    }
    assert fastest.destinations() == [
        LearnedDestination("web", str(A), "ISP1", 100),
        LearnedDestination("web", str(B), "ISP2", 31),
    ]


def test_the_winner_is_learned_unless_it_went_down_while_racing() -> None:
    fastest, backend, clock, _ = component()
    both = plan({"ISP1", "ISP2"})
    fastest.on_apply(both, ApplyKind.FULL)
    web = both.dispatches[0]
    fastest._learn(web, A, RaceResult({"ISP1": 0.150, "ISP2": 0.012}))
    assert backend.learned[WEB] == {A: Learned(2, 120.0)}
    assert fastest.learned[WEB] == {A: Entry("ISP2", clock.now + 120)}
    fastest.on_apply(plan({"ISP1"}), ApplyKind.MAPS)  # ISP2 down, then its race ends
    fastest._learn(web, B, RaceResult({"ISP2": 0.012}))
    fastest._learn(web, C, RaceResult({}))  # nobody answered
    assert backend.learned[WEB] == {} and fastest.learned[WEB] == {}
