"""The deadline queue and the fake clock: what every core's timers stand on."""

import pytest

from bus.clock import FakeClock
from bus.deadlines import Deadlines


def test_pop_due_returns_only_what_is_due_in_order():
    d = Deadlines()
    d.schedule("b", 20.0)
    d.schedule("a", 10.0)
    d.schedule("c", 30.0)
    assert d.pop_due(5.0) == []
    assert d.pop_due(20.0) == ["a", "b"]
    assert d.next_due() == 30.0
    assert len(d) == 1


def test_rescheduling_replaces_and_cancel_removes():
    d = Deadlines()
    d.schedule("peer", 10.0)
    d.schedule("peer", 25.0)
    assert d.pop_due(15.0) == []
    assert d.due_at("peer") == 25.0
    d.cancel("peer")
    assert d.pop_due(100.0) == []
    assert d.next_due() is None


def test_stale_entries_do_not_grow_without_bound():
    d = Deadlines()
    for i in range(10_000):
        d.schedule("peer", float(i))
    assert len(d._heap) < 200
    assert d.pop_due(1e9) == ["peer"]


def test_fake_clock_moves_only_forward_when_told():
    clock = FakeClock(100.0)
    assert clock.now() == 100.0
    clock.advance(2.5)
    assert clock.now() == 102.5
    clock.jump(110.0)
    assert clock.now() == 110.0
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_reconnect_backoff_doubles_is_jittered_and_resets():
    import random

    from bus.heartbeat import Backoff
    backoff = Backoff(0.25, 8.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    for i, delay in enumerate(delays):
        nominal = min(8.0, 0.25 * 2 ** i)
        assert nominal / 2 <= delay <= nominal
    assert len(set(delays)) == len(delays)
    many = [Backoff(1.0, 8.0, rng=random.Random(seed)).next_delay() for seed in range(200)]
    assert max(many) - min(many) > 0.4  # spread over the half that is random
    backoff.reset()
    assert backoff.next_delay() <= 0.25


def test_a_link_going_to_a_shorter_interval_gives_the_broker_a_full_period():
    """An idle link (5 s beats) last heard 4 s ago starts an upload (1 s): not dead at once."""
    import zmq

    from bus.link import LOST, DealerLink
    from schemas import encode, make
    ctx = zmq.Context()
    try:
        link = DealerLink(ctx, lambda: "tcp://127.0.0.1:9", encode, lambda now: make("HELLO", device_id="d"),
                          lambda now: make("HEARTBEAT"), 5.0, 3, max_frame=1 << 20)
        link.connect(100.0)
        link.set_interval(1.0, 104.0)
        assert link.next_deadline() == 101.0  # a heartbeat is owed at once (last sent: the HELLO at 100)...
        assert link.on_time(106.9) != LOST  # ...but the broker has 3 s from the change to show
        assert link.on_time(107.0) == LOST
    finally:
        link.close(say_bye=False)
        ctx.term()
