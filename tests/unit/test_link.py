"""The link state machine, driven by hand-made probe rounds and a fake clock."""

from __future__ import annotations

import pytest
from uplinkd import const
from uplinkd.config.model import Monitor
from uplinkd.monitor.link import Link, LinkState, Transition

GW = "192.0.2.1"
A, B = "198.51.100.1", "203.0.113.1"
DEFAULT = Monitor()  # max_successive_pkts_lost 3, min_successive_pkts_rcvd 5, 20 % / 10 %
# A monitor that reacts to every single round: the worst case for flapping.
TWITCHY = Monitor(
    interval_ms=50,
    max_successive_pkts_lost=1,
    min_successive_pkts_rcvd=1,
    max_packet_loss=100,
    min_packet_loss=100,
)


class Clock:
    """Monotonic time advanced by one probe interval per round."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.now = 1000.0
        self.interval_s = interval_s

    def step(self) -> float:
        self.now += self.interval_s
        return self.now


def rounds(
    link: Link, clock: Clock, pattern: str, targets: tuple[str, ...] = (GW,)
) -> list[Transition]:
    """Feed rounds: '+' every target answers (20 ms), '-' none does."""
    out: list[Transition] = []
    for mark in pattern:
        rtt = 20.0 if mark == "+" else None
        out += link.probe_round(dict.fromkeys(targets, rtt), clock.step())
    return out


def make(monitor: Monitor = DEFAULT, clock: Clock | None = None) -> tuple[Link, Clock]:
    """A link in init and a clock ticking at the monitor's interval."""
    clock = clock or Clock(monitor.interval_ms / 1000)
    return Link("DSL", monitor, [GW], 1, clock.now), clock


def up_link(monitor: Monitor = DEFAULT) -> tuple[Link, Clock]:
    link, clock = make(monitor)
    rounds(link, clock, "+" * monitor.min_successive_pkts_rcvd)
    assert link.state is LinkState.UP
    return link, clock


def test_up_after_min_successive_pkts_rcvd_good_rounds() -> None:
    link, clock = make()
    assert link.state is LinkState.INIT
    assert rounds(link, clock, "++++") == []
    (t,) = rounds(link, clock, "+")
    assert (t.link, t.old, t.new, t.at) == ("DSL", LinkState.INIT, LinkState.UP, clock.now)
    assert "5 probe rounds answered in a row (min_successive_pkts_rcvd 5)" in t.reason
    assert "0% lost over the last 5 rounds (min_packet_loss 10%)" in t.reason
    assert link.since == clock.now


def test_down_after_max_successive_pkts_lost() -> None:
    link, clock = up_link()
    assert rounds(link, clock, "--") == []
    (t,) = rounds(link, clock, "-")
    assert (t.old, t.new) == (LinkState.UP, LinkState.DOWN)
    assert t.reason == "3 probes lost in a row (max_successive_pkts_lost 3)"


def test_fresh_link_is_not_failed_by_its_first_loss() -> None:
    link, clock = make()
    # 1 of 2 rounds lost is 50 %, but a window of 2 rounds does not count yet.
    assert rounds(link, clock, "-+") == []
    assert link.state is LinkState.INIT
    strict, clock = make(Monitor(max_successive_pkts_lost=1))
    (t,) = rounds(strict, clock, "-")
    assert (t.old, t.new) == (LinkState.INIT, LinkState.DOWN)
    assert t.reason == "1 probes lost in a row (max_successive_pkts_lost 1)"


def test_init_goes_down_when_failing_from_the_start() -> None:
    link, clock = make()
    (t,) = rounds(link, clock, "---")
    assert (t.old, t.new) == (LinkState.INIT, LinkState.DOWN)


def test_loss_percent_takes_a_link_down_once_the_window_is_full() -> None:
    link, clock = up_link()
    # One loss in four rounds never makes 3 in a row, but is 25 % > max_packet_loss 20 %.
    out = rounds(link, clock, "+++-" * 10)
    assert [(t.old, t.new) for t in out] == [(LinkState.UP, LinkState.DOWN)]
    assert link.stats().consecutive_lost < DEFAULT.max_successive_pkts_lost
    assert out[0].reason == "20% of the last 20 probe rounds lost (max_packet_loss 20%)"


def test_recovery_waits_until_window_loss_is_at_most_min_packet_loss() -> None:
    link, clock = up_link()  # rounds 1-5 good
    rounds(link, clock, "---")  # rounds 6-8 lost: down
    assert link.state is LinkState.DOWN
    # 3 losses in the window stay above 10 % until round 6 leaves the 20-round window (round 26).
    assert rounds(link, clock, "+" * 17) == []
    assert link.stats().loss_percent == 15.0
    (t,) = rounds(link, clock, "+")
    assert (t.old, t.new) == (LinkState.DOWN, LinkState.UP)
    assert "18 probe rounds answered in a row" in t.reason
    assert "10% lost over the last 20 rounds (min_packet_loss 10%)" in t.reason


def test_one_dead_target_of_two_does_not_fail_a_healthy_link() -> None:
    clock = Clock()
    link = Link("DSL", DEFAULT, [A, B], 1, clock.now)
    for _ in range(100):
        link.probe_round({A: 12.0, B: None}, clock.step())
    assert link.state is LinkState.UP
    stats = link.stats()
    assert stats.loss_percent == 0.0
    assert stats.latency_ms == 12.0
    by_target = {t.target: t for t in stats.targets}
    assert (by_target[A].sent, by_target[A].received, by_target[A].loss_percent) == (20, 20, 0.0)
    assert (by_target[B].received, by_target[B].loss_percent, by_target[B].latency_ms) == (
        0,
        100.0,
        None,
    )


def test_reliability_two_of_two_fails_with_one_dead_target() -> None:
    clock = Clock()
    link = Link("DSL", DEFAULT, [A, B], 2, clock.now)
    rounds(link, clock, "+++++", (A, B))
    out: list[Transition] = []
    for _ in range(3):
        out += link.probe_round({A: 12.0, B: None}, clock.step())
    (t,) = out
    assert t.new is LinkState.DOWN
    assert t.reason == (
        "3 probe rounds in a row with fewer than 2 of 2 targets answering"
        " (max_successive_pkts_lost 3)"
    )


def test_reliability_is_capped_at_the_number_of_targets() -> None:
    clock = Clock()
    link = Link("DSL", DEFAULT, [A], 3, clock.now)
    rounds(link, clock, "+++++", (A,))
    assert link.state is LinkState.UP


def test_missing_and_unknown_targets_in_a_round() -> None:
    link, clock = make()
    for _ in range(5):
        link.probe_round({"10.9.9.9": 5.0}, clock.step())  # GW missing: lost
    assert link.state is LinkState.DOWN
    assert link.stats().consecutive_lost == 5
    assert [t.target for t in link.stats().targets] == [GW]


def test_latency_is_the_mean_over_replying_targets() -> None:
    clock = Clock()
    link = Link("DSL", DEFAULT, [A, B], 1, clock.now)
    link.probe_round({A: 10.0, B: 30.0}, clock.step())
    link.probe_round({A: 20.0, B: None}, clock.step())
    stats = link.stats()
    assert [t.latency_ms for t in stats.targets] == [15.0, 30.0]
    assert stats.latency_ms == 22.5


def test_carrier_loss_is_immediate_and_blocks_recovery() -> None:
    link, clock = up_link()
    (t,) = link.carrier(False, clock.step())
    assert (t.old, t.new, t.reason) == (LinkState.UP, LinkState.DOWN, "carrier lost")
    assert link.carrier(False, clock.step()) == []
    assert rounds(link, clock, "+" * 50) == []  # e.g. replies via another path: carrier wins
    assert link.state is LinkState.DOWN
    assert link.carrier(True, clock.step()) == []  # probing decides
    stats = link.stats()
    assert (stats.rounds, stats.consecutive_lost, stats.consecutive_received) == (0, 0, 0)
    assert rounds(link, clock, "++++") == []
    (t,) = rounds(link, clock, "+")
    assert (t.old, t.new) == (LinkState.DOWN, LinkState.UP)


def test_rounds_lost_in_flight_when_the_carrier_returns_do_not_hold_recovery() -> None:
    link, clock = up_link()
    link.carrier(False, clock.step())
    back = clock.step()
    link.carrier(True, back)
    # Two rounds sent while the cable was out end lost within one timeout of its return.
    timeout_s = DEFAULT.timeout_ms / 1000
    for delay in (timeout_s / 3, timeout_s * 2 / 3):
        assert link.probe_round({GW: None}, back + delay) == []
    assert link.stats().rounds == 0  # not counted: they say nothing about the path now
    clock.now = back + timeout_s
    assert rounds(link, clock, "++++") == []
    (t,) = rounds(link, clock, "+")  # five answered rounds, as after any clean start
    assert (t.old, t.new) == (LinkState.DOWN, LinkState.UP)


def test_a_loss_after_the_in_flight_time_counts() -> None:
    link, clock = up_link()
    link.carrier(False, clock.step())
    back = clock.step()
    link.carrier(True, back)
    link.probe_round({GW: None}, back + DEFAULT.timeout_ms / 1000 + 0.01)
    assert link.stats().rounds == 1
    assert link.stats().consecutive_lost == 1


def test_a_gateway_answering_arp_again_clears_the_losses_it_caused() -> None:
    link, clock = up_link()
    rounds(link, clock, "-" * 10)  # the gateway was silent on ARP: a full window of losses
    assert link.state is LinkState.DOWN
    assert link.gateway_back(clock.step()) == []
    assert rounds(link, clock, "++++") == []
    (t,) = rounds(link, clock, "+")  # 5 rounds, not the 18 that diluting 10 losses would take
    assert (t.old, t.new) == (LinkState.DOWN, LinkState.UP)


def test_a_gateway_answering_arp_leaves_an_up_link_alone() -> None:
    link, clock = up_link()
    rounds(link, clock, "--")
    assert link.gateway_back(clock.step()) == []
    assert link.stats().consecutive_lost == 2


def test_carrier_loss_from_init() -> None:
    link, clock = make()
    (t,) = link.carrier(False, clock.step())
    assert (t.old, t.new) == (LinkState.INIT, LinkState.DOWN)


def test_refused_routes_take_the_link_down_until_they_are_in_again() -> None:
    link, clock = up_link()
    (t,) = link.routes_refused(clock.step(), "device is administratively down")
    assert (t.old, t.new) == (LinkState.UP, LinkState.DOWN)
    assert t.reason == "its routes cannot be installed: device is administratively down"
    assert link.routes_missing
    assert rounds(link, clock, "+" * 30) == []  # replies that found another way out: no recovery
    assert link.routes_refused(clock.step(), "again") == []  # already down: no second change
    assert link.routes_installed(clock.step()) == []  # probing decides, from clean counters
    assert not link.routes_missing
    assert link.stats().rounds == 0
    assert rounds(link, clock, "++++") == []
    (t,) = rounds(link, clock, "+")
    assert (t.old, t.new) == (LinkState.DOWN, LinkState.UP)


def test_refused_routes_of_a_down_or_new_link_still_block_recovery() -> None:
    for start in ("init", "down"):
        link, clock = make()
        if start == "down":
            link.carrier(False, clock.step())
            link.carrier(True, clock.step())
        link.routes_refused(clock.step(), "device does not exist")
        assert link.state is LinkState.DOWN
        assert rounds(link, clock, "+" * 30) == []
        link.routes_installed(clock.step())
        assert rounds(link, clock, "+" * 5)[-1].new is LinkState.UP


def test_carrier_up_while_up_keeps_the_loss_window() -> None:
    link, clock = up_link()
    rounds(link, clock, "--")
    assert link.carrier(True, clock.step()) == []
    assert link.stats().consecutive_lost == 2  # a resync, not a change: nothing is forgotten


def test_networkmanager_down_and_up() -> None:
    link, clock = up_link()
    for hint in ("up", "dhcp4-change", "dhcp6-change", "connectivity-change"):
        assert link.notify(hint, clock.step()) == []
    assert link.state is LinkState.UP
    (t,) = link.notify("down", clock.step())
    assert (t.old, t.new) == (LinkState.UP, LinkState.DOWN)
    assert "NetworkManager" in t.reason and "'down'" in t.reason
    assert rounds(link, clock, "+" * 30) == []
    assert link.notify("up", clock.step()) == []
    (t,) = rounds(link, clock, "+" * 5)
    assert (t.old, t.new) == (LinkState.DOWN, LinkState.UP)


def test_carrier_up_also_ends_a_networkmanager_down() -> None:
    link, clock = up_link()
    link.notify("down", clock.step())
    link.carrier(True, clock.step())
    (t,) = rounds(link, clock, "+" * 5)
    assert t.new is LinkState.UP


def test_unknown_networkmanager_action_is_an_error() -> None:
    link, clock = make()
    with pytest.raises(ValueError, match=r"'pre-up'.*connectivity-change.*down.*up"):
        link.notify("pre-up", clock.now)


def test_admin_disable_and_enable() -> None:
    link, clock = up_link()
    (t,) = link.set_enabled(False, clock.step())
    assert (t.old, t.new, t.reason) == (
        LinkState.UP,
        LinkState.DISABLED,
        "disabled by the administrator",
    )
    assert link.set_enabled(False, clock.step()) == []
    assert rounds(link, clock, "-" * 10 + "+" * 10) == []
    assert link.carrier(False, clock.step()) == []
    assert link.tick(clock.now + 1000) == []
    assert link.state is LinkState.DISABLED
    link.carrier(True, clock.step())
    (t,) = link.set_enabled(True, clock.step())
    assert (t.old, t.new, t.reason) == (
        LinkState.DISABLED,
        LinkState.INIT,
        "enabled by the administrator",
    )
    assert link.stats().rounds == 0
    assert link.set_enabled(True, clock.step()) == []
    (t,) = rounds(link, clock, "+" * 5)
    assert (t.old, t.new) == (LinkState.INIT, LinkState.UP)


@pytest.mark.parametrize("state", [LinkState.INIT, LinkState.DOWN])
def test_disable_from_any_state(state: LinkState) -> None:
    link, clock = make()
    if state is LinkState.DOWN:
        rounds(link, clock, "---")
    assert link.state is state
    (t,) = link.set_enabled(False, clock.step())
    assert (t.old, t.new) == (state, LinkState.DISABLED)


def test_long_down_after_long_down_time_then_recovery() -> None:
    link, clock = up_link()
    rounds(link, clock, "---")
    down_at = link.since
    assert link.tick(down_at + 59.9) == []
    (t,) = link.tick(down_at + 60)
    assert (t.old, t.new, t.at) == (LinkState.DOWN, LinkState.LONG_DOWN, down_at + 60)
    assert t.reason == "down for 60 s (long_down_time 60 s)"
    assert link.tick(down_at + 1000) == []
    clock.now = down_at + 1000
    (t,) = rounds(link, clock, "+" * 20)
    assert (t.old, t.new) == (LinkState.LONG_DOWN, LinkState.UP)


def test_flap_damping_holds_recovery_with_doubling_holds() -> None:
    link, clock = up_link(TWITCHY)
    assert rounds(link, clock, "-+-+") != []  # flaps 1 and 2: no hold yet
    assert link.held_until is None
    (t,) = rounds(link, clock, "-")  # flap 3
    hold_end = clock.now + const.FLAP_HOLD_MIN_S
    assert link.held_until == hold_end
    assert "3 flaps without 60 s up in between, held down for 2 s" in t.reason
    assert rounds(link, clock, "+" * 30) == []  # 1.5 s of good rounds: still held
    assert link.tick(hold_end - 0.01) == []
    (t,) = link.tick(hold_end)
    assert (t.old, t.new, t.at) == (LinkState.DOWN, LinkState.UP, hold_end)
    assert "the 2 s flap hold-down is over" in t.reason
    assert link.held_until is None
    (t,) = rounds(link, clock, "-")  # flap 4: twice as long
    assert "held down for 4 s" in t.reason
    assert link.stats().flaps == 4


def test_flap_hold_is_capped() -> None:
    link, clock = up_link(TWITCHY)
    for _ in range(20):
        rounds(link, clock, "-")
        clock.now = link.held_until or clock.now
        rounds(link, clock, "+")
    assert link.state is LinkState.UP
    (t,) = rounds(link, clock, "-")
    assert f"held down for {const.FLAP_HOLD_MAX_S:g} s" in t.reason


def test_flap_count_decays_after_a_stable_spell() -> None:
    link, clock = up_link(TWITCHY)
    rounds(link, clock, "-+-+")
    assert link.stats().flaps == 2
    link.tick(clock.now + const.FLAP_WINDOW_S)
    assert link.stats().flaps == 0
    clock.now += const.FLAP_WINDOW_S
    (t,) = rounds(link, clock, "-")
    assert "flap" not in t.reason
    assert link.held_until is None


def test_probe_flapping_every_300ms_for_10s_is_bounded() -> None:
    # Undamped this makes 34 transitions (one per 300 ms phase); damped, 10: up/down at 0.0-1.5 s,
    # then holds of 2 s and 4 s leave two more up/down pairs, and the 8 s hold outlasts the test.
    clock = Clock(TWITCHY.interval_ms / 1000)
    link = Link("DSL", TWITCHY, [GW], 1, clock.now)
    out: list[Transition] = []
    for step in range(200):  # 50 ms rounds, good and bad in turns of 300 ms
        now = clock.step()
        good = (step // 6) % 2 == 0
        out += link.probe_round({GW: 20.0 if good else None}, now)
        out += link.tick(now)
    print(f"probe flapping: {len(out)} transitions in 10 s")
    assert len(out) <= 10
    assert link.stats().held_until is not None


def test_carrier_flapping_every_300ms_for_10s_is_bounded() -> None:
    # Undamped this makes 34 transitions; damped, 10 (as above).
    clock = Clock(TWITCHY.interval_ms / 1000)
    link = Link("DSL", TWITCHY, [GW], 1, clock.now)
    out: list[Transition] = []
    carrier = True
    for step in range(200):
        now = clock.step()
        if step % 6 == 0 and step:
            carrier = not carrier
            out += link.carrier(carrier, now)
        out += link.probe_round({GW: 20.0 if carrier else None}, now)
        out += link.tick(now)
    print(f"carrier flapping: {len(out)} transitions in 10 s")
    assert len(out) <= 10
    assert sum(t.reason == "carrier lost" for t in out) >= 2


def test_retarget_keeps_state_and_history() -> None:
    clock = Clock()
    link = Link("DSL", DEFAULT, [A, B], 1, clock.now)
    rounds(link, clock, "+" * 5, (A, B))
    link.retarget([B, GW], 2)
    assert link.state is LinkState.UP
    assert link.targets == (B, GW)
    by_target = {t.target: t for t in link.stats().targets}
    assert (by_target[B].sent, by_target[GW].sent) == (5, 0)
    with pytest.raises(ValueError, match="reliability"):
        link.retarget([A], 0)


def test_a_link_without_targets_cannot_come_up() -> None:
    clock = Clock()
    link = Link("DSL", DEFAULT, [], 1, clock.now)
    assert [t.new for t in (rounds(link, clock, "+++", ()))] == [LinkState.DOWN]


def test_each_link_has_its_own_machine() -> None:
    clock = Clock()
    one = Link("DSL", DEFAULT, [GW], 1, clock.now)
    two = Link("LTE", DEFAULT, [GW], 1, clock.now)
    rounds(one, clock, "+" * 5)
    assert (one.state, two.state) == (LinkState.UP, LinkState.INIT)
    assert one._machine is not two._machine
