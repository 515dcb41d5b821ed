"""The yield controller against a simulated office uplink, on a fake clock.

`Uplink` is a fluid model of the office router: a FIFO of `buffer_s` in
front of a link of `capacity` bytes per second, served in proportion to what
each sender puts in, the overflow dropped. The controller is driven the way
the agent drives it: it paces at `current_rate`, pings every probe interval
(the ping waits in the same queue, so its round trip is the base delay plus
the queueing delay when it was sent), and is told what the cloud
acknowledged per second, smoothed as `WireScheduler.ack_rate` is.

The competitors are the two shapes an office's traffic takes on that router:
a loss-based bulk flow (Reno's window: slow start, one segment per round
trip, 0.7 of it on a drop), and a flow in CUBIC's plateau after HyStart, whose
window stays put for seconds and alone queues just under the yield target. The
second is what the real shaped-link test met: a controller that takes such a
queue for its own shares the link with that flow instead of leaving it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import pytest

from roles.appliance.bandwidth import Bandwidth
from roles.render import render_agent_status
from roles.appliance.schedule import YIELD, parse_window
from roles.appliance.yielding import MIN_RATE, YieldController

MBIT = 1_000_000 / 8
CAPACITY = 95 * MBIT  # the TCP payload a 100 Mbit/s link carries
TARGET_S = 0.025
TICK_S = 0.001
MSS = 1448


@dataclass
class Uplink:
    capacity: float = CAPACITY
    buffer_s: float = 0.050
    base_s: float = 0.001
    queue: float = 0.0  # bytes

    @property
    def delay_s(self) -> float:
        return self.queue / self.capacity

    def carry(self, ours: float, theirs: float) -> tuple[float, float, bool]:
        """One tick: bytes delivered for us and for them, and whether the buffer overflowed."""
        offered = (ours + theirs) * TICK_S
        self.queue += offered
        served = min(self.queue, self.capacity * TICK_S)
        self.queue -= served
        dropped = self.queue > self.capacity * self.buffer_s
        self.queue = min(self.queue, self.capacity * self.buffer_s)
        mine = served * ours * TICK_S / offered if offered else 0.0
        return mine, served - mine, dropped


@dataclass
class WindowFlow:
    """A window-based TCP sender: `window` bytes in flight, its rate the window over the round trip. Held
    still, it is CUBIC on its plateau near its last maximum (seconds long on a short round trip)."""
    window: float

    def rate(self, path: Uplink) -> float:
        return self.window / (path.base_s + path.delay_s)

    def tick(self, path: Uplink, dropped: bool, now: float) -> None:
        pass


@dataclass
class RenoFlow(WindowFlow):
    """A loss-based bulk sender: doubling per round trip until the first drop, then one segment per round
    trip, cut to 0.7 on a drop (at most once per round trip)."""
    window: float = 10 * MSS
    slow_start: bool = True
    quiet_until: float = 0.0
    cuts: list = field(default_factory=list)  # when its window was cut

    def tick(self, path: Uplink, dropped: bool, now: float) -> None:
        rtt = path.base_s + path.delay_s
        if dropped and now >= self.quiet_until:
            self.window *= 0.7
            self.cuts.append(now)
            self.slow_start = False
            self.quiet_until = now + rtt
        elif self.slow_start:
            self.window *= 2 ** (TICK_S / rtt)
        else:
            self.window += MSS * TICK_S / rtt


@dataclass
class ConstantFlow:
    """Traffic that does not adapt: a video call, a remote desktop session."""
    bytes_per_s: float

    def rate(self, path: Uplink) -> float:
        return self.bytes_per_s

    def tick(self, path: Uplink, dropped: bool, now: float) -> None:
        pass


@dataclass
class Run:
    """The agent's side of the simulation: pacing, pings in flight, the acknowledged rate."""
    path: Uplink = field(default_factory=Uplink)
    now: float = 0.0
    ctl: YieldController = None
    pings: list = field(default_factory=list)  # (arrives, sent)
    ack_rate: float = 0.0
    acked: float = 0.0
    acked_since: float = 0.0
    ours: list = field(default_factory=list)  # per tick: (bytes ours, bytes theirs)
    delays: list = field(default_factory=list)  # per tick: the router's queueing delay

    def __post_init__(self):
        self.ctl = YieldController(self.now, target_s=TARGET_S)

    def run(self, seconds: float, competitor=None) -> None:
        for _ in range(round(seconds / TICK_S)):
            self.now += TICK_S
            ours = self.ctl.current_rate(self.now)
            theirs = competitor.rate(self.path) if competitor else 0.0
            mine, other, dropped = self.path.carry(ours, theirs)
            if competitor:
                competitor.tick(self.path, dropped, self.now)
            self.ours.append((mine, other))
            self.delays.append(self.path.delay_s)
            self._acknowledge(mine)
            self._ping()

    def _acknowledge(self, nbytes: float) -> None:
        self.acked += nbytes
        if self.now - self.acked_since >= 0.1:
            self.ack_rate = 0.7 * self.ack_rate + 0.3 * self.acked / (self.now - self.acked_since)
            self.acked, self.acked_since = 0.0, self.now

    def _ping(self) -> None:
        if self.ctl.probe_due(self.now):
            self.ctl.probe_sent(self.now)
            self.pings.append((self.now + self.path.base_s + self.path.delay_s, self.now))
        while self.pings and self.pings[0][0] <= self.now:
            _, sent = self.pings.pop(0)
            self.ctl.on_rtt(self.now - sent, self.now, self.ack_rate)

    def share(self, start_s: float, end_s: float, theirs: bool = False) -> float:
        """What one side got of the link's capacity between two moments."""
        ticks = self.ours[round(start_s / TICK_S):round(end_s / TICK_S)]
        return sum(t[1 if theirs else 0] for t in ticks) / (CAPACITY * (end_s - start_s))

    def first_held(self, start_s: float, end_s: float, share: float, hold_s: float = 2.0) -> float | None:
        """The first moment from which we had `share` of the link over `hold_s`."""
        t = start_s
        while t + hold_s <= end_s:
            if self.share(t, t + hold_s) >= share:
                return t
            t += 0.1
        return None


def test_alone_it_fills_the_link_and_keeps_the_queue_short():
    r = Run()
    r.run(40.0)
    assert r.first_held(0.0, 10.0, 0.90) is not None, "not at 90% of the link within 10 s"
    assert r.share(10.0, 40.0) >= 0.90, f"{r.share(10.0, 40.0):.1%} of the link over 30 s alone"


@pytest.mark.parametrize("base_ms", [1, 10, 25])
def test_it_leaves_a_loss_based_flow_the_link_and_takes_it_back_when_it_stops(base_ms):
    r = Run(path=Uplink(base_s=base_ms / 1000))
    r.run(15.0)
    r.run(20.0, RenoFlow())
    r.run(15.0)
    assert r.share(15.0, 35.0, theirs=True) >= 0.80, \
        f"the bulk flow got {r.share(15.0, 35.0, theirs=True):.1%}, we {r.share(15.0, 35.0):.1%}"
    back = r.first_held(35.0, 50.0, 0.85)
    assert back is not None and back - 35.0 <= 5.0, f"85% of the link held from {back} (the flow stopped at 35 s)"


def test_on_a_long_round_trip_it_takes_only_what_the_flow_leaves_unused():
    """At 50 ms, a Reno flow whose slow start ended early (on the queue we had when it began) grows one
    segment per round trip and leaves the link half empty for many seconds: that part is ours to take, as
    long as the flow is never cut again on our account."""
    r = Run(path=Uplink(base_s=0.050))
    r.run(15.0)
    flow = RenoFlow()
    r.run(20.0, flow)
    assert [t for t in flow.cuts if t > 16.0] == [], f"the flow's window was cut at {flow.cuts} (it began at 15 s)"
    assert r.share(20.0, 35.0) + r.share(20.0, 35.0, theirs=True) >= 0.90, "the link was left idle"


def test_a_queue_standing_just_under_the_target_is_someone_elses():
    """A flow whose window alone queues 0.8 of the target: a controller that weighs the queue as its own
    stops cutting at a fifth of the link (the queue then sits at the target), and keeps it."""
    r = Run()
    r.run(15.0)
    r.run(10.0, WindowFlow(window=0.8 * TARGET_S * CAPACITY))
    assert r.share(18.0, 25.0) <= 0.05, f"we kept {r.share(18.0, 25.0):.1%} of the link"
    assert r.ctl.current_rate(r.now) <= 0.05 * CAPACITY, \
        f"pacing at {r.ctl.current_rate(r.now) / MBIT:.1f} Mbit/s beside a standing queue"


@pytest.mark.parametrize("call_share", [0.1, 0.3])
def test_a_call_keeps_its_rate_and_little_delay_and_we_take_most_of_what_it_leaves(call_share):
    r = Run()
    r.run(15.0)
    r.run(30.0, ConstantFlow(call_share * CAPACITY))
    assert r.share(20.0, 45.0, theirs=True) >= 0.99 * call_share, "the call lost traffic"
    delays = r.delays[20_000:45_000]
    assert sum(delays) / len(delays) <= TARGET_S, f"the call waited {sum(delays) / len(delays) * 1e3:.1f} ms"
    assert r.share(20.0, 45.0) >= 0.6 * (1 - call_share), f"we took {r.share(20.0, 45.0):.1%} of the link"


def test_a_link_that_frees_up_after_a_smaller_peak_was_learned_is_taken_within_seconds():
    """Started beside a call that took 80% (so the peak learned is the 20% left), the call ends: the rate
    is above that peak with no queue, which says the peak was not the link's."""
    r = Run()
    r.run(20.0, ConstantFlow(0.8 * CAPACITY))
    assert r.ctl.peak_delivery_rate <= 0.3 * CAPACITY
    r.run(15.0)
    back = r.first_held(20.0, 35.0, 0.85)
    assert back is not None and back - 20.0 <= 6.0, f"85% of the link held from {back} (the call ended at 20 s)"


def test_our_own_queue_is_drained_from_just_under_what_is_delivered_unless_it_keeps_growing():
    ctl = YieldController(0.0, target_s=TARGET_S, start_rate=10_000_000, slowdown_every_s=1e9)
    now = 0.0
    for _ in range(50):  # no queue: 10 MB/s delivered
        now += 0.1
        ctl.on_rtt(0.001, now, 10_000_000)
    ctl.rate = 10_500_000  # pacing 5% over what the link delivers builds a queue
    for queue_s in (0.080, 0.080, 0.070, 0.050, 0.030):  # seen late, at three times the target, then draining
        now += 0.1
        ctl.on_rtt(0.001 + queue_s, now, 10_000_000)
    assert ctl.current_rate(now) == pytest.approx(9_000_000, rel=0.02)
    for queue_s in (0.040, 0.060, 0.080):  # growing again under that rate: not only ours
        now += 0.1
        ctl.on_rtt(0.001 + queue_s, now, 10_000_000)
    assert ctl.current_rate(now) < 0.5 * 9_000_000


def test_it_stays_near_the_floor_when_the_path_is_busy_from_the_start():
    """No peak is known yet, so nothing is foreign: plain LEDBAT against a flow that fills the buffer."""
    r = Run()
    r.run(20.0, RenoFlow())
    assert r.share(0.0, 20.0) <= 0.05, f"we took {r.share(0.0, 20.0):.1%} of a link someone else was filling"
    assert r.ctl.current_rate(r.now) <= 4 * MIN_RATE


def test_with_little_to_send_the_rate_holds_at_twice_what_was_delivered():
    """An agent with one small incremental sees no queue at any rate: unchecked, its rate would be a burst
    into the office router when the next full upload starts."""
    ctl = YieldController(0.0, target_s=TARGET_S, slowdown_every_s=1e9)
    now = 0.0
    for _ in range(300):
        now += 0.1
        ctl.on_rtt(0.001, now, 1_000_000)
    assert 1_000_000 <= ctl.current_rate(now) <= 2 * 1_000_000


def test_status_shows_what_the_controller_knows_and_a_reload_changes_the_target():
    bandwidth = Bandwidth(YIELD, (), 25)
    noon = dt.datetime(2026, 1, 5, 12, 0)
    rate = bandwidth.current(0.0, noon)
    for i in range(1, 40):
        bandwidth.yielding.on_rtt(0.002, i * 0.1, 5_000_000)
    doc = bandwidth.describe(bandwidth.current(4.0, noon))
    assert doc["limit"] == "yield" and doc["base_delay_ms"] == 2.0 and doc["queue_delay_ms"] == 0.0
    assert doc["peak_delivery_bytes_per_s"] == 5_000_000 and doc["rate_bytes_per_s"] > rate
    text = render_agent_status({"device_id": "office-1", "broker": "tcp://198.18.1.2:5550", "connected": True,
                                "bandwidth": doc, "datasets": [], "transfers": []})
    assert "queueing delay 0.0 ms over a base of 2.0 ms" in text and "delivered up to 40.0 Mbit/s" in text
    bandwidth.reconfigure(YIELD, (), 10)
    assert bandwidth.yielding.target_s == 0.010


def test_a_fixed_limit_window_in_between_keeps_what_was_learned_of_the_path():
    """yield at night, 10Mbit in office hours: back in yield the next evening, the base delay and the link's
    peak are still known, and the moment's state (recent samples, a queue's age) starts afresh."""
    office_hours = (parse_window({"days": "all", "from": "08:00", "to": "18:00", "limit": "10Mbit"}, 0),)
    bandwidth = Bandwidth(YIELD, office_hours, 25)
    night = dt.datetime(2026, 11, 23, 6, 0)
    bandwidth.current(0.0, night)
    learned = bandwidth.yielding
    for i in range(1, 40):
        learned.on_rtt(0.002, i * 0.1, 5_000_000)
    assert bandwidth.current(4.0, night.replace(hour=9)) == 1_250_000 and bandwidth.yielding is None
    bandwidth.current(5.0, night.replace(hour=19))
    assert bandwidth.yielding is learned
    assert learned.base_delay_s == 0.002 and learned.peak_delivery_rate == 5_000_000
    assert learned.probe_due(5.0) and learned.over_since is None
