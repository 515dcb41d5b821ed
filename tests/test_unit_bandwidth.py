"""Bandwidth management without sockets: schedule windows, the token bucket,
the weighted wire scheduler and the yield controller, on a fake clock."""

import datetime as dt

import pytest

from roles.appliance.ratelimit import TokenBucket
from roles.appliance.schedule import YIELD, limit_at, parse_limit, parse_window
from roles.appliance.wire import WireScheduler, wire_cost
from roles.appliance.yielding import MIN_RATE, YieldController

MONDAY = dt.datetime(2026, 11, 23)


def windows(*items):
    return tuple(parse_window(item, i) for i, item in enumerate(items))


def test_first_matching_window_wins_else_the_limit():
    ws = windows({"days": "mon-fri", "from": "08:00", "to": "18:00", "limit": "10Mbit"},
                 {"days": "all", "from": "07:00", "to": "19:00", "limit": "yield"})
    assert limit_at(ws, None, MONDAY.replace(hour=9))[0] == 1_250_000
    assert limit_at(ws, None, MONDAY.replace(hour=7, minute=30))[0] == YIELD
    assert limit_at(ws, None, MONDAY.replace(hour=20)) == (None, "limit")
    saturday = MONDAY + dt.timedelta(days=5)
    assert limit_at(ws, 5, saturday.replace(hour=9))[0] == YIELD


def test_windows_over_midnight_and_to_the_second():
    ws = windows({"days": "fri", "from": "22:00", "to": "06:00:30", "limit": "none"})
    friday = MONDAY + dt.timedelta(days=4)
    assert limit_at(ws, 7, friday.replace(hour=23))[1].startswith("schedule")
    assert limit_at(ws, 7, (friday + dt.timedelta(days=1)).replace(hour=6, second=29))[1].startswith("schedule")
    assert limit_at(ws, 7, (friday + dt.timedelta(days=1)).replace(hour=6, second=31)) == (7, "limit")


@pytest.mark.parametrize("item", [
    {"days": "mon-fry", "from": "08:00", "to": "18:00", "limit": "1MB"},
    {"days": "mon", "from": "8h", "to": "18:00", "limit": "1MB"},
    {"days": "mon", "from": "08:00", "to": "18:00", "limit": "fast"},
    {"days": "mon", "from": "08:00", "to": "18:00"},
    {"days": "mon", "from": "08:00", "to": "18:00", "limit": "1MB", "extra": 1},
])
def test_bad_windows_are_refused(item):
    with pytest.raises(ValueError):
        parse_window(item, 0)


def test_limit_units():
    assert parse_limit("40Mbit") == 5_000_000
    assert parse_limit("yield") == YIELD
    assert parse_limit("none") is None


def test_bucket_never_exceeds_rate_over_any_100ms():
    now = 0.0
    bucket = TokenBucket(1_000_000, now)
    sent = []  # (time, bytes)
    piece = bucket.piece_size(1 << 20)
    while now < 5.0:
        wait = bucket.wait_s(piece, now)
        if wait:
            now += wait + 0.003  # a loop that wakes late
            continue
        bucket.spend(piece, now)
        sent.append((now, piece))
    total = sum(n for _, n in sent)
    assert 0.95 * 5_000_000 <= total <= 1.05 * 5_000_000
    for start, _ in sent:
        window = sum(n for t, n in sent if start <= t < start + 0.1)
        assert window <= 1.25 * 100_000


class Flow:
    def __init__(self, chunks):
        self.left = chunks
        self.sent = 0
        self.pieces = []

    def next_piece(self, limit):
        return min(limit, self.left) if self.left else None

    def send_piece(self, limit, now):
        n = min(limit, self.left)
        self.left -= n
        self.sent += n
        self.pieces.append(n)
        return n


def test_weights_share_the_wire_and_the_window_bounds_in_flight():
    wire = WireScheduler(window=4 << 20, now=0.0, rate=10_000_000)
    heavy, light = Flow(1 << 30), Flow(1 << 30)
    wire.add("heavy", heavy, 3)
    wire.add("light", light, 1)
    now = 0.0
    while now < 10.0:
        wait = wire.pump(now, 1 << 20)
        assert wire.in_flight <= wire.window + wire.bucket.piece_size(1 << 20)
        now += wait if wait else 0.01
        wire.acknowledged(wire.in_flight)  # a fast cloud acknowledges everything
    assert heavy.sent / light.sent == pytest.approx(3.0, rel=0.1)
    # the limit holds on the link's frames; the payload is what is left of them
    on_link = sum(wire_cost(n) for flow in (heavy, light) for n in flow.pieces)
    assert on_link / now == pytest.approx(10_000_000, rel=0.02)
    assert (heavy.sent + light.sent) / now < 0.96 * 10_000_000


def test_a_pieces_cost_on_the_link_counts_its_message_and_its_segments_headers():
    # a 50,000-byte piece (5 ms at 80 Mbit/s) and its 208 bytes of message: 35 segments of 1448 bytes
    assert wire_cost(50_000) == 50_208 + 35 * 66
    assert 1.04 < wire_cost(50_000) / 50_000 < 1.055  # about the 5% that crossed the link unaccounted
    assert wire_cost(1) == 1 + 208 + 66


def test_yield_backs_off_on_queueing_delay_and_recovers():
    now = 0.0
    y = YieldController(now, target_s=0.025, start_rate=5_000_000, slowdown_every_s=1e9)
    for _ in range(20):  # an empty path: 10 ms round trips
        now += 0.1
        y.on_rtt(0.010, now, y.current_rate(now))  # all of it acknowledged
    fast = y.current_rate(now)
    for _ in range(20):  # someone fills the office router's queue: +100 ms
        now += 0.1
        y.on_rtt(0.110, now, y.current_rate(now))
    assert y.current_rate(now) <= 0.2 * fast  # e-fold per second while the queue stays
    for _ in range(40):
        now += 0.1
        y.on_rtt(0.110, now, y.current_rate(now))
    assert y.current_rate(now) <= max(MIN_RATE, fast / 100)
    for _ in range(100):  # the queue drains
        now += 0.1
        y.on_rtt(0.010, now, y.current_rate(now))  # all of it acknowledged
    assert y.current_rate(now) >= fast


def test_yield_slows_down_periodically_to_relearn_the_base_delay():
    y = YieldController(0.0, slowdown_every_s=5.0, slowdown_s=0.3)
    assert y.current_rate(4.9) > MIN_RATE
    assert y.current_rate(5.0) == MIN_RATE
    assert y.current_rate(5.2) == MIN_RATE
    assert y.current_rate(5.4) > MIN_RATE


def test_compression_effort_follows_the_bottleneck():
    from roles.appliance.effort import CompressionEffort
    effort = CompressionEffort(1, adapt=True, period_s=1.0)
    now = 0.0
    for _ in range(5):  # the link holds us back: more effort
        now += 1.0
        effort.update(now, link_bound=50, starved=2)
    assert effort.level == 6
    for _ in range(10):  # the CPU holds us back: less
        now += 1.0
        effort.update(now, link_bound=0, starved=50)
    assert effort.level == 1
    assert CompressionEffort(3, adapt=False).update(10.0, 100, 0) == 3


def test_the_acknowledged_rate_is_not_averaged_over_a_pause_in_sending():
    wire = WireScheduler(window=64 << 20, now=0.0, rate=10_000_000)

    def send_for(seconds, now):
        flow = Flow(int(seconds * 10_000_000))
        wire.add("f", flow, 1)
        while flow.left:
            wait = wire.pump(now, 1 << 20)
            now += wait if wait else 0.01
            wire.acknowledged(wire.in_flight, now)  # a fast cloud acknowledges everything
        wire.remove("f")
        return now

    now = send_for(2.0, 0.0)
    busy = wire.ack_rate
    assert busy == pytest.approx(10_000_000, rel=0.1)
    now = send_for(0.3, now + 30.0)  # half a minute idle, then sending at the same pace again
    assert wire.ack_rate >= 0.9 * busy
