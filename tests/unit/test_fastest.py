"""fastest.py without a kernel: what is raced, and what the learned maps hold as links come and go.

The race itself and the NFLOG reports run against the kernel in
tests/integration/test_fastest_response.py.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Coroutine
from typing import Any

import pytest
from uplinkd.config.model import Match, Method, Rule
from uplinkd.datapath.backends.base import ApplyKind, Learned
from uplinkd.datapath.nflog import LoggedPacket, NflogError, NflogListener
from uplinkd.errors import ApplyError
from uplinkd.planning import planner
from uplinkd.planning.plan import Plan
from uplinkd.runtime.fastest import (
    MAX_RACES,
    NON_GLOBAL,
    SUMMARY_S,
    Entry,
    FastestResponse,
    LearnedDestination,
    RaceResult,
    TokenBucket,
)

from tests.fakes.backend import FakeBackend

from .test_planner import config, facts

IP = ipaddress.IPv4Address
A, B, C = IP("203.0.113.20"), IP("203.0.113.30"), IP("203.0.113.40")
WEB = "rule_0_web"


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def plan(up: set[str], method: Method = Method.FASTEST_RESPONSE, **settings: Any) -> Plan:
    """A fastest-response rule "web" over ISP1-3; the documentation addresses of these tests
    are raced (race_private) unless a test says otherwise."""
    settings = {"cache_seconds": 120, "race_private": True, **settings}
    web = Rule("web", method, Match(proto="tcp"), **settings)
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
    fastest.on_apply(plan({"ISP1", "ISP2"}, races_per_second=1000), ApplyKind.FULL)
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
    backend.learned[WEB] = {A: Learned(1, 100.0), B: Learned(2, 100.0), C: Learned(3, 5.0)}
    clock.now += 10  # C has expired (in the kernel too, which the fake does not do)
    fastest.on_apply(plan({"ISP1", "ISP3"}), ApplyKind.MAPS)  # ISP2 went down
    # B, won by ISP2, is deleted; A is left as it was (before: the whole map rewritten).
    assert backend.learned == {WEB: {A: Learned(1, 100.0), C: Learned(3, 5.0)}}
    assert set(fastest.learned[WEB]) == {A}
    del backend.learned[WEB][C]
    fastest.on_apply(plan({"ISP1", "ISP3"}), ApplyKind.NONE)  # nothing changed: no rewrite
    backend.learned.clear()
    fastest.on_apply(plan({"ISP1", "ISP3"}), ApplyKind.NONE)
    assert backend.learned == {}
    fastest.on_apply(plan({"ISP1", "ISP3"}), ApplyKind.FULL)  # a rebuilt table gets them back
    assert backend.learned == {WEB: {A: Learned(1, 90.0)}}


def test_a_destination_gone_from_the_kernel_meanwhile_has_the_map_written_whole() -> None:
    fastest, backend, clock, _ = component()
    fastest.on_apply(plan({"ISP1", "ISP2"}), ApplyKind.FULL)
    fastest.learned[WEB] = {A: Entry("ISP1", clock.now + 100), B: Entry("ISP2", clock.now + 100)}
    backend.learned[WEB] = {A: Learned(1, 100.0)}  # B timed out there first
    fastest.on_apply(plan({"ISP1"}), ApplyKind.MAPS)
    assert backend.learned == {WEB: {A: Learned(1, 100.0)}}  # refused delete: written whole
    assert set(fastest.learned[WEB]) == {A}


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


# --- bounds: what a LAN client can make the router do ------------------------------------------


def close_all(spawned: list[Coroutine[Any, Any, None]]) -> None:
    for coroutine in spawned:
        coroutine.close()


def test_the_token_bucket_allows_its_rate_and_one_burst() -> None:
    bucket = TokenBucket(rate=5, burst=5, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(100)) == 5  # the burst
    assert not bucket.take(0.1)  # half a token
    assert bucket.take(0.2)
    # Over 10 s of asking 1000 times a second: the rate, never more.
    allowed = sum(bucket.take(0.2 + i / 1000) for i in range(1, 10_001))
    assert 49 <= allowed <= 50  # 10 s at 5/s (the 50th token is due at the very last call)
    assert sum(bucket.take(1000.0) for _ in range(100)) == 5  # idle time saves one burst only
    assert not bucket.take(999.0)  # a clock stepping back gives nothing


def test_a_scan_is_raced_at_the_rule_rate_and_the_rest_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client reporting 1000 new destinations a second for 5 s gets rate*5 + burst races."""
    fastest, _, clock, spawned = component()
    fastest.on_apply(plan({"ISP1", "ISP2"}, races_per_second=20), ApplyKind.FULL)
    caplog.set_level("INFO", logger="uplinkd")
    for i in range(5000):
        clock.now = 1000.0 + i / 1000
        fastest.on_packet(packet(IP("198.51.100.0") + i % 250 + (i // 250) * 256))
        for key in list(fastest.racing):  # races end at once here: MAX_RACES is not the limit
            fastest.racing.discard(key)
    assert len(spawned) == 20 + 20 * 5 - 1  # the burst, then 20/s over 4.999 s
    assert fastest.totals["raced"] == len(spawned)
    assert fastest.totals["rate limit"] == 5000 - len(spawned)
    assert "rule web: new destinations in the last 10 s" not in caplog.text  # 5 s so far
    clock.now += SUMMARY_S
    fastest.on_packet(packet(IP("192.0.2.1")))
    assert "rule web: new destinations in the last 15 s: " in caplog.text
    assert "rate limit" in caplog.text and "raced" in caplog.text
    close_all(spawned)


def test_each_rule_has_its_own_rate_and_a_reload_keeps_a_bucket_it_does_not_change() -> None:
    fastest, _, _, spawned = component()
    fastest.on_apply(plan({"ISP1", "ISP2"}, races_per_second=3), ApplyKind.FULL)
    for i in range(10):
        fastest.on_packet(packet(IP("198.51.100.0") + i))
    assert len(spawned) == 3
    fastest.racing.clear()
    fastest.on_apply(plan({"ISP1"}, races_per_second=3), ApplyKind.MAPS)  # same rate: no refill
    fastest.on_packet(packet(IP("198.51.100.200")))
    assert len(spawned) == 3
    fastest.on_apply(plan({"ISP1"}, races_per_second=6), ApplyKind.FULL)  # a new rate, new bucket
    fastest.on_packet(packet(IP("198.51.100.201")))
    assert len(spawned) == 4
    close_all(spawned)


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",  # the ISP's carrier-grade NAT
        "127.0.0.1",
        "169.254.1.1",
        "224.0.0.251",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "0.0.0.0",
        "192.0.2.1",
        "198.18.0.1",
    ],
)
def test_destinations_outside_the_internet_are_not_raced_by_default(address: str) -> None:
    fastest, _, _, spawned = component()
    fastest.on_apply(plan({"ISP1", "ISP2"}, race_private=False), ApplyKind.FULL)
    fastest.on_packet(packet(IP(address)))
    assert spawned == [] and fastest.totals == {"excluded": 1}
    fastest.on_apply(plan({"ISP1", "ISP2"}, race_private=True), ApplyKind.FULL)
    fastest.on_packet(packet(IP(address)))
    assert len(spawned) == 1  # unless the rule asks for them
    close_all(spawned)


def test_public_destinations_are_raced_by_default() -> None:
    fastest, _, _, spawned = component()
    fastest.on_apply(plan({"ISP1", "ISP2"}, race_private=False), ApplyKind.FULL)
    for address in ("1.1.1.1", "8.8.8.8", "100.128.0.1", "172.32.0.1", "223.255.255.254"):
        fastest.on_packet(packet(IP(address)))
    assert len(spawned) == 5
    assert not any(IP("100.128.0.1") in network for network in NON_GLOBAL)
    close_all(spawned)


def test_the_links_own_networks_and_gateways_are_never_raced() -> None:
    fastest, _, _, spawned = component()
    both = plan({"ISP1", "ISP2", "ISP3"}, race_private=True)
    fastest.on_apply(both, ApplyKind.FULL)
    own = [link.address.ip for link in both.links] + [link.gateway for link in both.links]
    for address in own:
        assert address is not None
        fastest.on_packet(packet(address))
        fastest.on_packet(packet(address + 1))  # a neighbour on the ISP's network
    assert spawned == [] and fastest.totals["excluded"] == 2 * len(own)
    fastest.on_packet(packet(A))
    assert len(spawned) == 1
    close_all(spawned)


def test_the_learned_table_is_capped_and_expired_entries_make_room() -> None:
    fastest, backend, clock, _ = component()
    capped = plan({"ISP1", "ISP2"}, max_learned=16)
    fastest.on_apply(capped, ApplyKind.FULL)
    web = capped.dispatches[0]
    first = IP("198.51.100.0")
    for i in range(40):
        fastest._learn(web, first + i, RaceResult({"ISP1": 0.01}))
        clock.now += 1
    assert len(fastest.learned[WEB]) == len(backend.learned[WEB]) == 16
    assert set(fastest.learned[WEB]) == {first + i for i in range(16)}  # the first 16 stay
    assert fastest.totals["not learned: table full"] == 24
    fastest._learn(web, first + 3, RaceResult({"ISP2": 0.01}))  # one already there: relearned
    assert fastest.learned[WEB][first + 3].link == "ISP2"
    clock.now = 1000 + 120 + 0.5  # the first has expired (the second not yet): room for one
    fastest._learn(web, first + 100, RaceResult({"ISP1": 0.01}))
    assert first + 100 in fastest.learned[WEB] and first not in fastest.learned[WEB]
    assert len(fastest.learned[WEB]) == 16


def test_a_kernel_map_that_refuses_an_entry_leaves_it_unlearned() -> None:
    fastest, backend, _, _ = component()
    both = plan({"ISP1", "ISP2"})
    fastest.on_apply(both, ApplyKind.FULL)

    def full(*args: object, **kwargs: object) -> None:
        raise ApplyError("cannot update the destinations of rule map fr_rule_0_web: full")

    backend.learn = full  # type: ignore[method-assign]
    fastest._learn(both.dispatches[0], A, RaceResult({"ISP1": 0.01}))
    assert fastest.learned[WEB] == {} and fastest.totals["not learned: kernel refused"] == 1


def test_a_smaller_cap_after_a_reload_keeps_the_most_recent() -> None:
    fastest, backend, clock, _ = component()
    fastest.on_apply(plan({"ISP1", "ISP2"}), ApplyKind.FULL)
    first = IP("198.51.100.0")
    fastest.learned[WEB] = {first + i: Entry("ISP1", clock.now + 100 + i) for i in range(40)}
    fastest.on_apply(plan({"ISP1", "ISP2"}, max_learned=16), ApplyKind.FULL)
    assert list(fastest.learned[WEB]) == [first + i for i in range(24, 40)]
    assert set(backend.learned[WEB]) == set(fastest.learned[WEB])


def test_a_learned_destination_reported_again_is_not_raced() -> None:
    fastest, _, clock, spawned = component()
    fastest.on_apply(plan({"ISP1", "ISP2"}), ApplyKind.FULL)
    fastest.learned[WEB] = {A: Entry("ISP1", clock.now + 100)}
    fastest.on_packet(packet(A))
    assert spawned == []
    clock.now += 101  # forgotten: raced again
    fastest.on_packet(packet(A))
    assert len(spawned) == 1
    close_all(spawned)


def test_destinations_are_rebuilt_at_most_once_a_second() -> None:
    fastest, _, clock, _ = component()
    fastest.on_apply(plan({"ISP1", "ISP2"}), ApplyKind.FULL)
    fastest.learned[WEB] = {
        IP("198.51.100.0") + i: Entry("ISP1", clock.now + 100) for i in range(0, 3000, 3)
    }
    first = fastest.destinations()
    assert len(first) == 1000
    assert [d.address for d in first[:3]] == ["198.51.100.0", "198.51.100.3", "198.51.100.6"]
    assert first[-1].address == "198.51.111.181"  # sorted as addresses, not as text
    fastest.learned[WEB][IP("198.51.100.1")] = Entry("ISP2", clock.now + 100)
    clock.now += 0.5
    assert fastest.destinations() == first  # the order is not taken again within a second
    assert fastest.page(1, 2) == (first[1:3], 1000)
    clock.now += 0.5
    assert len(fastest.destinations()) == 1001
    assert fastest.page(1, 1) == ([LearnedDestination("web", "198.51.100.1", "ISP2", 99)], 1001)
    fastest.learned[WEB].clear()
    fastest.on_apply(plan({"ISP1", "ISP2"}), ApplyKind.MAPS)  # an apply drops the order
    assert fastest.destinations() == []
